"""SET and RigL on SparseLinear: the Sparsifier interface of the masked methods, connections move at fixed nnz,
values and optimizer state follow their weights, RigL grows where the dense gradient is largest, the same
decisions as the masked RigL, and a resumed run is bitwise the uninterrupted one."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsetorch import RigL, SparsityError, SRigL
from sparsetorch.integrations import load_training_state, save_training_state
from sparsetorch.core.masks import get_mask
from sparsetorch.models import MLP
from sparsetorch.sparse_training import (CompressedRigL, CompressedSET, CompressedSRigL, SparseLinear, to_dense,
                                         to_sparse_training)
from sparsetorch.sparsifiers.method_registry import for_run, make_sparsifier

CLASSES = [CompressedSET, CompressedRigL]
ALL = [*CLASSES, CompressedSRigL]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = MLP((30, 40, 40, 3)).to(dtype)
    return to_sparse_training(model, 0.8, "uniform", generator=torch.Generator().manual_seed(seed))


def _train(model, opt, dst, steps, seed=2, dtype=torch.float32):
    losses = []
    for step in steps:
        x = torch.randn(16, 30, generator=torch.Generator().manual_seed(seed * 1000 + step), dtype=dtype)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dst.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", CLASSES)
def test_update_moves_connections_and_state(cls):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = cls(every=3, drop_fraction=0.25, generator=torch.Generator().manual_seed(1)).attach(model, opt)
    layer = model.fc1
    _train(model, opt, dst, range(2))
    nnz, flat_before = layer.nnz, layer.flat_positions()
    fc2_before = set(model.fc2.flat_positions().tolist())
    if cls is CompressedRigL:
        assert layer._want_dense_grad  # armed: the next backward forms the dense gradient
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(9))
    reference = to_dense(copy.deepcopy(model))
    reference(x).pow(2).mean().backward()
    score = reference.fc1.weight.grad.abs().flatten()  # dL/dW at every position
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    if cls is CompressedRigL:  # only k candidates and the kept positions' |g| are recorded, not [out, in]
        assert layer.grow_candidates[0].numel() == int(round(0.25 * nnz)) and layer.active_grad.shape == (nnz,)
        torch.testing.assert_close(layer.active_grad, score[flat_before])
    opt.step()
    w_step = layer.dense_weight().flatten()
    m_step = torch.zeros_like(w_step)
    m_step[flat_before] = opt.state[layer.values]["exp_avg"]
    dst.step()  # step 3: update
    k = int(round(0.25 * nnz))
    # dropped: the k smallest magnitudes after the optimizer step; grown: k among the rest (after the drop)
    dropped = flat_before[torch.argsort(w_step[flat_before].abs(), stable=True)[:k]]
    kept = set(flat_before.tolist()) - set(dropped.tolist())
    flat_after = layer.flat_positions()
    assert layer.nnz == nnz and layer.values.shape == (nnz,) and torch.equal(flat_after, flat_after.unique())
    assert kept <= set(flat_after.tolist())
    if cls is CompressedRigL:  # what RigL grows: top |dL/dW| among positions inactive after the drop
        score[torch.tensor(sorted(kept))] = -1
        assert set(flat_after.tolist()) == kept | set(torch.topk(score, k).indices.tolist())
        assert layer.grow_candidates is None and not layer._want_dense_grad  # freed, disarmed until the next update
    old, new = set(flat_before.tolist()), set(flat_after.tolist())
    row = dst.history[-1]
    fc2_new = len(set(model.fc2.flat_positions().tolist()) - fc2_before)
    assert row["step"] == 3 and row["moved"] == len(new - old) + fc2_new and len(new - old) > 0
    assert row["fraction"] == 0.25
    assert row["density"] == pytest.approx(dst.history[0]["density"])
    w_after = layer.dense_weight().flatten()
    m_after = torch.zeros_like(m_step)
    m_after[flat_after] = opt.state[layer.values]["exp_avg"]
    stay, grown = torch.tensor(sorted(old & new)), torch.tensor(sorted(new - old))
    assert torch.equal(w_after[stay], w_step[stay]) and not w_after[grown].any()
    assert torch.equal(m_after[stay], m_step[stay]) and not m_after[grown].any()
    # the layer still computes the masked dense product with the new connectivity (transposed map refreshed)
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(3), requires_grad=True)
    layer.values.grad = None
    layer(x).sum().backward()
    w = layer.dense_weight().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    nn.functional.linear(xr, w, layer.bias.detach()).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, w.grad.flatten()[flat_after], rtol=1e-5, atol=1e-5)


def test_same_decisions_as_masked_rigl():
    """float64, SGD with momentum: the compressed RigL keeps exactly the positions the masked RigL keeps."""
    torch.manual_seed(0)
    dense = MLP((30, 40, 40, 3)).double()
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    masked = RigL(sparsity=0.5, distribution="uniform", every=2, drop_fraction=0.3, end=9).attach(dense, opt_d)
    sparse = MLP((30, 40, 40, 3)).double()
    sparse.load_state_dict(dense.state_dict())
    sparse = to_sparse_training(sparse, 0.5, "uniform")
    for name in ("fc1", "fc2"):  # the masked run's connectivity and values
        mask = get_mask(getattr(dense, name), "weight").flatten()
        layer = getattr(sparse, name)
        layer.set_connectivity(mask.nonzero().flatten())
        with torch.no_grad():
            layer.values.copy_(getattr(dense, name).weight.flatten()[mask])
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    compressed = CompressedRigL(sparsity=0.5, distribution="uniform", every=2, drop_fraction=0.3,
                                end=9).attach(sparse, opt_s)
    for model, opt, dst in ((dense, opt_d, masked), (sparse, opt_s, compressed)):
        _train(model, opt, dst, range(8), dtype=torch.float64)
    assert [r["step"] for r in masked.history] == [r["step"] for r in compressed.history] == [0, 2, 4, 6, 8]
    assert [r["moved"] for r in masked.history] == [r["moved"] for r in compressed.history]
    assert all(r["moved"] > 0 for r in compressed.history[1:])
    for name in ("fc1", "fc2"):
        mask = get_mask(getattr(dense, name), "weight").flatten()
        assert torch.equal(getattr(sparse, name).flat_positions(), mask.nonzero().flatten())
        torch.testing.assert_close(getattr(sparse, name).dense_weight(), getattr(dense, name).weight.detach())


def test_schedule_is_the_masked_one():
    for kw in ({"end": 40}, {"end": 40, "decay": "constant"}, {}):
        a, b = RigL(every=3, drop_fraction=0.4, **kw), CompressedRigL(every=3, drop_fraction=0.4, **kw)
        for step in range(0, 50):
            assert a.is_update_step(step) == b.is_update_step(step)
            assert a.fraction(step) == b.fraction(step)


@pytest.mark.parametrize("cls", ALL)
def test_training_is_deterministic_and_learns(cls):
    results = []
    for _ in range(2):
        model = _model(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        dst = cls(every=4, drop_fraction=0.3, end=20, generator=torch.Generator().manual_seed(4)).attach(model, opt)
        losses = _train(model, opt, dst, range(20), seed=5)
        results.append((losses, [m.flat_positions() for m in model.modules() if isinstance(m, SparseLinear)]))
        assert [h["step"] for h in dst.history] == [0, 4, 8, 12, 16]
        assert dst.history[1]["fraction"] > dst.history[-1]["fraction"]  # cosine decay
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[0][0][-1] < results[0][0][0]


@pytest.mark.parametrize("cls", ALL)
def test_resume_is_bitwise_the_uninterrupted_run(cls, tmp_path):
    def setup(seed):
        model = _model(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, cls(every=3, drop_fraction=0.3, end=12, generator=torch.Generator().manual_seed(7))

    model, opt, dst = setup(0)
    _train(model, opt, dst.attach(model, opt), range(10))
    reference = model.state_dict(), opt.state_dict()["state"], dst.history, dst.generator.get_state()

    model, opt, dst = setup(0)
    _train(model, opt, dst.attach(model, opt), range(5))  # the next step (6) updates: RigL must be re-armed
    save_training_state(model, tmp_path / "ckpt", opt, dst, extra={"next": 5})
    model, opt, dst = setup(123)  # a fresh process: other connectivity and values until loaded
    assert load_training_state(model, tmp_path / "ckpt", opt, dst) == {"next": 5}
    assert dst.step_count == 5
    _train(model, opt, dst, range(5, 10))
    for (name, a), b in zip(reference[0].items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for key, state in reference[1].items():
        for name, value in state.items():
            assert torch.equal(value, opt.state_dict()["state"][key][name]), (key, name)
    assert dst.history == reference[2] and len(dst.history) == 4
    assert torch.equal(dst.generator.get_state(), reference[3])


def test_same_errors_as_the_masked_sparsifiers():
    for bad in ({"every": 0}, {"every": 1.5}, {"drop_fraction": 1.5}, {"drop_fraction": 0}, {"decay": "linear"},
                {"end": 0}, {"sparsity": 1.2}, {"distribution": "normal"}):
        with pytest.raises(SparsityError) as masked:
            RigL(**bad)
        with pytest.raises(SparsityError) as compressed:
            CompressedRigL(**bad)
        assert str(masked.value).replace("RigL", "X") == str(compressed.value).replace("CompressedRigL", "X")
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    dst = CompressedSET()
    with pytest.raises(SparsityError, match=r"call attach\(model, optimizer\) before step\(\)"):
        dst.step()
    with pytest.raises(SparsityError, match="before state_dict"):
        dst.state_dict()
    with pytest.raises(SparsityError, match="not in the optimizer"):
        dst.attach(model, torch.optim.Adam([model.fc1.values]))
    assert dst.model is None  # nothing half-changed: attaching again works
    assert dst.attach(model, opt) is dst
    with pytest.raises(SparsityError, match="already attached"):
        dst.attach(model, opt)
    with pytest.raises(SparsityError, match="to_sparse_training"):
        CompressedSET().attach(MLP((3, 4, 2)))
    with pytest.raises(SparsityError, match="matches no SparseLinear"):
        CompressedSET(include="nope*").attach(model)
    with pytest.raises(SparsityError, match="layers hold their sparsity"):
        CompressedSET(sparsity=0.5).attach(model)
    assert CompressedSET(sparsity=0.8, distribution="uniform").attach(_model()).density() == pytest.approx(0.2)
    assert [t.fqn for t in CompressedSET(exclude="fc2").attach(_model()).targets] == ["fc1"]
    other = _model()
    other.fc2 = SparseLinear(40, 40, 0.5)
    with pytest.raises(SparsityError, match="does not match"):
        CompressedSET().attach(other).load_state_dict(dst.state_dict())
    rigl = CompressedRigL(every=1).attach(_model())
    with pytest.raises(SparsityError, match="no dense gradient"):
        rigl.step()  # an update step with no backward before it
    assert rigl.history == [rigl.history[0]]  # nothing moved
    assert dst.remove() is model and dst.model is None


def test_registry_builds_the_compressed_variants():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    dst = make_sparsifier("rigl", compressed=True, **for_run("rigl", sparsity=0.8, total_steps=40))
    assert type(dst) is CompressedRigL and (dst.every, dst.end, dst.drop_fraction) == (1, 30, 0.3)
    with pytest.raises(SparsityError, match="layers hold their sparsity"):  # ERK asked, the layers are uniform
        dst.attach(model, opt)
    assert type(make_sparsifier("SET", compressed=True)) is CompressedSET
    assert type(make_sparsifier("srigl", compressed=True)) is CompressedSRigL
    with pytest.raises(SparsityError, match="no compressed variant"):
        make_sparsifier("gmp", compressed=True)


def test_rigl_gradient_accumulation():
    """grad_accumulation=n keeps the dense gradient summed over the micro-batches; the default (k candidates
    per layer) makes the same decisions with one backward pass and refuses a second one."""
    def run(accumulation, passes):
        model = _model(4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dst = CompressedRigL(every=2, drop_fraction=0.3, grad_accumulation=accumulation).attach(model, opt)
        for step in range(4):
            for p in range(passes):
                x = torch.randn(8, 30, generator=torch.Generator().manual_seed(10 * step + p))
                model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            dst.step()
        return [m.flat_positions() for m in (model.fc1, model.fc2)], dst

    (top_k, dst), (dense, _) = run(1, 1), run(3, 1)
    assert all(torch.equal(a, b) for a, b in zip(top_k, dense)) and dst.history[-1]["moved"] > 0
    accumulated, dst = run(2, 2)
    assert dst.history[-1]["moved"] > 0 and not all(torch.equal(a, b) for a, b in zip(top_k, accumulated))
    with pytest.raises(SparsityError, match="grad_accumulation"):
        run(1, 2)


def test_rigl_same_decisions_without_the_compiled_kernels(monkeypatch):
    def run():
        model = _model(5, torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dst = CompressedRigL(every=2, drop_fraction=0.3).attach(model, opt)
        _train(model, opt, dst, range(4), dtype=torch.float64)
        return [m.flat_positions() for m in (model.fc1, model.fc2)]

    with_kernels = run()
    monkeypatch.setenv("SPARSETORCH_DISABLE_EXT", "1")  # torch sparse ops and the torch growth path
    assert all(torch.equal(a, b) for a, b in zip(with_kernels, run()))


def _fan_in(layer: SparseLinear) -> torch.Tensor:
    return layer.indptr.diff()


def test_srigl_same_decisions_as_masked_srigl_with_ablation():
    """float64: CompressedSRigL keeps exactly the positions (and ablates the units) the masked SRigL does."""
    torch.manual_seed(0)
    dense = MLP((30, 40, 40, 3)).double()
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    masked = SRigL(sparsity=0.9, distribution="uniform", every=2, drop_fraction=0.5, end=11, ablation=0.3,
                   generator=torch.Generator().manual_seed(1)).attach(dense, opt_d)
    sparse = MLP((30, 40, 40, 3)).double()
    sparse.load_state_dict(dense.state_dict())
    sparse = to_sparse_training(sparse, 0.9, "uniform")
    for name in ("fc1", "fc2"):  # the masked run's constant fan-in connectivity and values
        mask = get_mask(getattr(dense, name), "weight").flatten()
        layer = getattr(sparse, name)
        layer._resize(int(mask.sum()))
        layer.set_connectivity(mask.nonzero().flatten())
        with torch.no_grad():
            layer.values.copy_(getattr(dense, name).weight.flatten()[mask])
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    compressed = CompressedSRigL(every=2, drop_fraction=0.5, end=11, ablation=0.3).attach(sparse, opt_s)
    for step in range(10):  # random targets: units lose their salient weights and get ablated
        g = torch.Generator().manual_seed(50 + step)
        x, y = torch.randn(16, 30, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        for model, opt, dst in ((dense, opt_d, masked), (sparse, opt_s, compressed)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            dst.step()
        for name in ("fc1", "fc2"):
            mask = get_mask(getattr(dense, name), "weight").flatten()
            assert torch.equal(getattr(sparse, name).flat_positions(), mask.nonzero().flatten()), (step, name)
    assert [r["moved"] for r in masked.history] == [r["moved"] for r in compressed.history]
    assert any(int((_fan_in(getattr(sparse, n)) == 0).sum()) > 0 for n in ("fc1", "fc2"))  # something ablated
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(getattr(sparse, name).dense_weight(), getattr(dense, name).weight.detach())


def test_srigl_lays_out_constant_fan_in_and_keeps_it():
    model = _model(4)  # random connectivity: unequal rows
    assert int(_fan_in(model.fc1).max() - _fan_in(model.fc1).min()) > 1
    nnz = {n: getattr(model, n).nnz for n in ("fc1", "fc2")}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = CompressedSRigL(every=2, drop_fraction=0.5, generator=torch.Generator().manual_seed(0)).attach(model, opt)
    for _ in range(3):
        _train(model, opt, dst, range(4))
        for name, n in nnz.items():
            fan = _fan_in(getattr(model, name))
            live = fan[fan > 0]
            assert getattr(model, name).nnz == n and int(live.max() - live.min()) <= 1
    assert all(r["moved"] > 0 for r in dst.history[1:])
    with pytest.raises(SparsityError, match="ablation"):
        CompressedSRigL(ablation=1.0)
