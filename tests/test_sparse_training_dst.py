"""SET and RigL on SparseLinear: connections move at fixed nnz, values and optimizer state follow their
weights, RigL grows where the dense gradient is largest, and the compressed layers stay correct."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetorch import SparsityError
from sparsetorch.sparse_training import CompressedRigL, CompressedSET, SparseLinear, to_sparse_training


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3))
    return to_sparse_training(model, 0.8, "uniform", generator=g)


def _train_step(model, opt, dst, g):
    x = torch.randn(16, 30, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    dst.step()
    return loss.item()


@pytest.mark.parametrize("cls", [CompressedSET, CompressedRigL])
def test_update_moves_connections_and_state(cls):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = cls(model, opt, update_every=3, drop_fraction=0.25, generator=torch.Generator().manual_seed(1))
    layer = model[0]
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        _train_step(model, opt, dst, g)
    nnz, flat_before = layer.nnz, layer.flat_positions()
    w_before = layer.dense_weight()
    m_before = torch.zeros(layer.out_features * layer.in_features)
    m_before[flat_before] = opt.state[layer.values]["exp_avg"]
    if cls is CompressedRigL:
        assert layer._want_dense_grad  # armed: the next backward forms the dense gradient
    x = torch.randn(16, 30, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    if cls is CompressedRigL:  # what RigL should grow: top |dL/dW| among inactive positions
        score = layer.dense_grad.abs().flatten().clone()
        score[flat_before] = -1
        k = int(round(0.25 * nnz))
        expect_grown = set(torch.topk(score, k).indices.tolist())
    opt.step()
    w_step = layer.dense_weight()
    m_step = torch.zeros_like(m_before)
    m_step[flat_before] = opt.state[layer.values]["exp_avg"]
    dst.step()  # t = 3: update
    assert dst.history[-1]["step"] == 3 and dst.history[-1]["moved"] > 0
    flat_after = layer.flat_positions()
    assert layer.nnz == nnz and layer.values.shape == (nnz,) and torch.equal(flat_after, flat_after.unique())
    kept = set(flat_before.tolist()) & set(flat_after.tolist())
    grown = set(flat_after.tolist()) - set(flat_before.tolist())
    k = int(round(0.25 * nnz))
    assert len(grown) == k and len(kept) == nnz - k
    # dropped = the k smallest magnitudes of the weights after the optimizer step
    dropped = set(flat_before.tolist()) - kept
    assert max(w_step.flatten()[list(dropped)].abs()) <= min(w_step.flatten()[list(kept)].abs())
    w_after = layer.dense_weight().flatten()
    m_after = torch.zeros_like(m_before)
    m_after[flat_after] = opt.state[layer.values]["exp_avg"]
    kept_t, grown_t = torch.tensor(sorted(kept)), torch.tensor(sorted(grown))
    assert torch.equal(w_after[kept_t], w_step.flatten()[kept_t]) and not w_after[grown_t].any()
    assert torch.equal(m_after[kept_t], m_step[kept_t]) and not m_after[grown_t].any()
    if cls is CompressedRigL:
        assert grown == expect_grown
        assert layer.dense_grad is None and not layer._want_dense_grad  # freed, disarmed until the next update
    # the layer still computes the masked dense product with the new connectivity (transposed map refreshed)
    x = torch.randn(5, 30, generator=g, requires_grad=True)
    layer(x).sum().backward()
    w = layer.dense_weight().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    nn.functional.linear(xr, w, layer.bias.detach()).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, w.grad.flatten()[flat_after], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [CompressedSET, CompressedRigL])
def test_training_is_deterministic_and_learns(cls):
    results = []
    for _ in range(2):
        model = _model(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        dst = cls(model, opt, update_every=4, drop_fraction=0.3, end_step=20,
                  generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(5)
        losses = [_train_step(model, opt, dst, g) for _ in range(20)]
        results.append((losses, [m.flat_positions() for m in model if isinstance(m, SparseLinear)]))
        assert [h["step"] for h in dst.history] == [4, 8, 12, 16]
        assert dst.history[0]["fraction"] > dst.history[-1]["fraction"]  # cosine decay
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[0][0][-1] < results[0][0][0]


def test_state_dict_resumes_generator():
    model = _model()
    dst = CompressedSET(model, None, update_every=1, generator=torch.Generator().manual_seed(7))
    state = dst.state_dict()
    a = dst.grow(model[0], 5, model[0].flat_positions())
    dst.load_state_dict(state)
    b = dst.grow(model[0], 5, model[0].flat_positions())
    assert torch.equal(a, b)


def test_errors():
    with pytest.raises(SparsityError, match="to_sparse_training"):
        CompressedSET(nn.Sequential(nn.Linear(3, 3)), None)
    model = _model()
    dst = CompressedRigL(model, None, update_every=5)
    with pytest.raises(SparsityError, match="dense gradient"):
        dst.update()  # no backward ran on an armed step
