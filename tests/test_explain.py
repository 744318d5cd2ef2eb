"""Explain: importance and connectivity numbers checked against hand computations."""
import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, explain
from sparsetorch.models import MLP, SmallCNN


def _mlp(seed=0, sizes=(6, 5, 4, 3)):
    torch.manual_seed(seed)
    return MLP(sizes)


def _masked_abs(layer):
    mask = sparsetorch.get_mask(layer)
    return layer.weight.detach().abs() * (mask if mask is not None else 1)


def test_path_importance_is_product_of_abs_weights():
    model = _mlp()
    sparsetorch.prune(model, 0.5, scope="layer")
    w1, w2, w3 = (_masked_abs(m) for m in (model.fc1, model.fc2, model.classifier))
    expected = torch.ones(1, 3, dtype=torch.float64) @ w3.double() @ w2.double() @ w1.double()
    got = explain.feature_importance(model, "paths")
    assert torch.allclose(got.double(), expected[0], rtol=1e-5)


def test_connectivity_is_first_layer_column_sums():
    model = _mlp()
    sparsetorch.prune(model, 0.6, scope="layer")
    assert torch.allclose(explain.feature_importance(model, "connectivity"), _masked_abs(model.fc1).sum(0))


def test_planted_connectivity_ranks_connected_inputs_first():
    model = _mlp(sizes=(20, 16, 3))
    mask = torch.zeros(16, 20, dtype=torch.bool)
    mask[:, :5] = True
    sparsetorch.set_mask(model.fc1, mask)
    for method in ("connectivity", "paths"):
        imp = explain.feature_importance(model, method)
        assert set(torch.topk(imp, 5).indices.tolist()) == set(range(5))
        assert torch.all(imp[5:] == 0)


def test_grad_x_input_is_zero_where_input_is_zero():
    model = _mlp(sizes=(8, 6, 3))
    x = torch.rand(10, 8)
    x[:, 2] = 0
    imp = explain.feature_importance(model, "grad_x_input", data=x)
    assert imp.shape == (8,) and imp[2] == 0 and imp.sum() > 0
    with pytest.raises(SparsityError, match="needs data"):
        explain.feature_importance(model, "grad_x_input")


def test_conv_importance_is_an_image():
    torch.manual_seed(0)
    cnn = SmallCNN(channels=4)
    sparsetorch.prune(cnn, 0.8)
    for method in ("connectivity", "paths"):
        imp = explain.feature_importance(cnn, method, input_shape=(1, 8, 8))
        assert imp.shape == (1, 8, 8) and torch.all(imp >= 0) and imp.sum() > 0
    with pytest.raises(SparsityError, match="input_shape"):
        explain.feature_importance(cnn)


def test_critical_connections_are_synflow_scores():
    model = _mlp()
    rows = explain.critical_connections(model, k=4)
    assert len(rows) == 4 and rows == sorted(rows, key=lambda r: -r["flow"])
    r = rows[0]
    layer = dict(model.named_modules())[r["layer"]]
    assert layer.weight[r["index"]].item() == pytest.approx(r["weight"])


def test_top_paths_finds_the_best_path():
    model = _mlp(sizes=(3, 3, 2))
    with torch.no_grad():
        model.fc1.weight.fill_(0.1)
        model.classifier.weight.fill_(0.1)
        model.fc1.weight[2, 1] = 5.0
        model.classifier.weight[0, 2] = 3.0
    best = explain.top_paths(model, k=2)[0]
    assert best["units"] == [1, 2, 0] and best["product"] == pytest.approx(15.0)


def test_dead_and_isolated_units():
    model = _mlp(sizes=(4, 3, 2))
    m1 = torch.ones(3, 4, dtype=torch.bool)
    m1[1] = False  # hidden unit 1 has no input
    m2 = torch.ones(2, 3, dtype=torch.bool)
    m2[:, 2] = False  # hidden unit 2 feeds nothing
    sparsetorch.set_mask(model.fc1, m1)
    sparsetorch.set_mask(model.classifier, m2)
    dead = explain.dead_units(model)
    assert dead["fc1"] == {"no_input": [1], "no_output": [2]}
    rows = explain.connectivity(model)
    assert rows[0].fan_in.tolist() == [4, 0, 4] and rows[1].fan_out.tolist() == [2, 2, 0]


def test_cost_estimate_matches_report():
    model = _mlp(sizes=(64, 128, 10))
    sparsetorch.prune(model, 0.9)
    est = explain.cost_estimate(model, torch.zeros(1, 64))
    assert est.dense_macs == 64 * 128 + 128 * 10
    assert est.sparse_macs == int(sparsetorch.get_mask(model.fc1).sum()) + 128 * 10
    assert est.energy_ratio > 2 and "Horowitz" in est.source and "estimate" in est.note


def test_mask_dynamics_counts_moves_survival_and_stabilisation():
    a = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)  # moves one connection: 1 -> 2
    c = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)  # moves it on: 2 -> 3 (the growth at 2 did not survive)
    snaps = [{"l": a}, {"l": b}, {"l": c}, {"l": c}, {"l": c}]
    dyn = explain.mask_dynamics(snaps, [0, 10, 20, 30, 40])
    assert dyn.dropped == [1, 1, 0, 0] and dyn.grown == [1, 1, 0, 0]
    assert dyn.grown_surviving == [0, 1, 0, 0] and dyn.survival_rate == 0.5
    assert dyn.stable_from == 20


def test_mask_recorder_snapshots_model_masks():
    model = _mlp()
    rec = explain.MaskRecorder(model)
    sparsetorch.prune(model, 0.5, method="random", generator=torch.Generator().manual_seed(0))
    rec.record(0)
    sparsetorch.prune(model, 0.75, method="random", generator=torch.Generator().manual_seed(1))
    rec.record(1)
    dyn = explain.mask_dynamics(rec.snapshots, rec.steps)
    assert dyn.grown == [0] and dyn.dropped[0] > 0
