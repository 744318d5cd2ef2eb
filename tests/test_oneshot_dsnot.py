"""DSnoT refinement (oneshot/dsnot.py): never worse than its start, better than Wanda alone, and the mask invariants."""
import pytest
import torch

from sparsetorch import SparsityError
from sparsetorch.core.patterns import is_valid_mask, parse_pattern
from sparsetorch.oneshot.dsnot import dsnot_refine
from sparsetorch.oneshot.solvers import magnitude_mask, sparsegpt_solve, wanda_mask


def _inputs(n, d, seed, outliers=4):
    """Correlated inputs (a low-rank mix plus noise), a few large-magnitude outlier channels, nonzero means."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    X[:, torch.randperm(d, generator=g)[:outliers]] *= 10.0
    return X + 0.3 * torch.randn(d, generator=g)  # [n, d]


def _stats(X):
    return {"x_mean": X.mean(0), "x_sq_norm": X.square().sum(0), "hessian": 2 * X.T @ X / X.shape[0]}


def _error(W0, W, X):
    """||(W0 - W) X^T||^2 in float64: the calibration reconstruction error."""
    return float((X.double() @ (W0 - W).double().T).square().sum())


def _start(method, W0, stats, density, pat):
    if method == "magnitude":
        keep = magnitude_mask(W0, density, pat, "row")
        return W0 * keep, keep
    if method == "wanda":
        keep = wanda_mask(W0, stats["x_sq_norm"], density, pat)
        return W0 * keep, keep
    W, keep, _ = sparsegpt_solve(W0, stats["hessian"], density, pat)
    return W, keep


def _layer(seed, out=48, d=96, n=256):
    X = _inputs(n, d, seed)
    W0 = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 100)) / d**0.5
    return W0, X, _stats(X)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worsens_reconstruction_error(method, pattern, seed):
    W0, X, stats = _layer(seed)
    pat = parse_pattern(pattern)
    W, keep = _start(method, W0, stats, 0.5 if pattern == "2:4" else 0.35, pat)
    W1, keep1, info = dsnot_refine(W0, W, keep, pattern=pat, **stats)
    before, after = _error(W0, W, X), _error(W0, W1, X)
    n = X.shape[0]
    assert after <= before * (1 + 1e-6)
    # the running d H bookkeeping matches a full recompute (H = 2 X^T X / n, so d H d^T = 2 ||d X^T||^2 / n)
    assert info["error_before"] == pytest.approx(2 * before / n, rel=1e-4)
    assert info["error_after"] == pytest.approx(2 * after / n, rel=1e-4)
    assert info["swaps"] > 0 and after < before  # on these inputs even SparseGPT's result improves


@pytest.mark.parametrize("sparsity", [0.6, 0.7])
def test_wanda_plus_dsnot_beats_wanda_on_correlated_inputs(sparsity):
    ratios = []
    for seed in (0, 1):
        W0, X, stats = _layer(seed, out=64, d=128, n=512)
        pat = parse_pattern("unstructured")
        keep = wanda_mask(W0, stats["x_sq_norm"], 1 - sparsity, pat)
        W1, _, _ = dsnot_refine(W0, W0 * keep, keep, pattern=pat, **stats)
        ratios.append(_error(W0, W1, X) / _error(W0, W0 * keep, X))
    print(f"sparsity {sparsity}: error(Wanda+DSnoT) / error(Wanda) = {ratios}")
    assert max(ratios) < 0.8


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("with_hessian", [True, False])
def test_counts_pattern_and_values(pattern, with_hessian):
    W0, X, stats = _layer(3)
    pat = parse_pattern(pattern)
    W, keep = _start("sparsegpt", W0, stats, 0.5 if pat.kind == "nm" else 0.3, pat)
    if not with_hessian:
        stats = {"x_mean": stats["x_mean"], "x_sq_norm": stats["x_sq_norm"], "n_tokens": X.shape[0]}
    W1, keep1, info = dsnot_refine(W0, W, keep, pattern=pat, threshold=0.0, **stats)
    assert info["swaps"] > 0
    assert torch.equal(keep1.sum(1), keep.sum(1))  # every row keeps as many weights
    if pat.kind == "nm":
        assert is_valid_mask(keep1, pat)
        assert torch.all(keep1.reshape(-1, pat.m).sum(1) == pat.n)
    grown, cut, same = keep1 & ~keep, keep & ~keep1, keep & keep1
    assert grown.any()
    assert torch.equal(W1[grown], W0[grown])  # regrown weights take their dense values
    assert torch.all(W1[~keep1] == 0)  # pruned ones are 0
    assert torch.equal(W1[same], W[same])  # the rest keep the first method's values
    assert cut.sum() == grown.sum()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_deterministic(pattern):
    W0, X, stats = _layer(4)
    pat = parse_pattern(pattern)
    W, keep = _start("wanda", W0, stats, 0.5 if pattern == "2:4" else 0.3, pat)
    a = dsnot_refine(W0, W, keep, pattern=pat, **stats)
    b = dsnot_refine(W0, W, keep, pattern=pat, **stats)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("with_hessian", [True, False])
def test_dead_inputs_no_nan(pattern, with_hessian):
    W0, X, _ = _layer(5)
    X[:, ::5] = 0.0  # inputs that never fire
    stats = _stats(X)
    pat = parse_pattern(pattern)
    W, keep = _start("wanda", W0, stats, 0.5 if pattern == "2:4" else 0.3, pat)
    if not with_hessian:
        stats = {"x_mean": stats["x_mean"], "x_sq_norm": stats["x_sq_norm"], "n_tokens": X.shape[0]}
    W1, keep1, info = dsnot_refine(W0, W, keep, pattern=pat, **stats)
    assert torch.isfinite(W1).all()
    assert torch.equal(keep1.sum(1), keep.sum(1))
    if with_hessian:
        assert _error(W0, W1, X) <= _error(W0, W, X) * (1 + 1e-6)
        assert all(v == v for v in (info["error_before"], info["error_after"]))  # not NaN


def test_all_inputs_dead_and_nothing_to_do():
    W0 = torch.randn(8, 16)
    zeros = torch.zeros(16)
    keep = magnitude_mask(W0, 0.5, parse_pattern("unstructured"), "row")
    W1, keep1, info = dsnot_refine(W0, W0 * keep, keep, x_mean=zeros, x_sq_norm=zeros,
                                   hessian=torch.zeros(16, 16), pattern="unstructured")
    assert torch.equal(keep1, keep) and torch.isfinite(W1).all() and info["swaps"] == 0
    full = torch.ones_like(keep)  # a dense row has nothing to regrow
    _, keep2, info = dsnot_refine(W0, W0, full, x_mean=zeros, x_sq_norm=zeros, hessian=torch.eye(16),
                                  pattern="unstructured")
    assert torch.equal(keep2, full) and info["swaps"] == 0 and info["cycles"] == 0


def test_bad_arguments():
    W0 = torch.randn(4, 8)
    keep = torch.ones(4, 8, dtype=torch.bool)
    stats = {"x_mean": torch.zeros(8), "x_sq_norm": torch.ones(8)}
    with pytest.raises(SparsityError, match="n_tokens"):
        dsnot_refine(W0, W0, keep, pattern="unstructured", **stats)
    with pytest.raises(SparsityError, match="shape"):
        dsnot_refine(W0, W0, keep[:, :4], pattern="unstructured", n_tokens=4, **stats)
    with pytest.raises(SparsityError, match="block"):
        dsnot_refine(W0, W0, keep, pattern="block:2x2", n_tokens=4, **stats)
    with pytest.raises(SparsityError, match="divisible"):
        dsnot_refine(W0, W0, keep, pattern="2:3", n_tokens=4, **stats)


def test_prune_oneshot_refine_dsnot_never_worsens_any_layer():
    import copy

    from sparsetorch.core.masks import iter_masks
    from sparsetorch.models import MLP
    from sparsetorch.oneshot import prune_oneshot

    torch.manual_seed(0)
    dense = MLP((64, 128, 96, 10))
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 64, generator=g)
    calib = [torch.randn(64, 16, generator=g) @ mix + 0.1 * torch.randn(64, 64, generator=g) for _ in range(4)]
    X = {"fc1": torch.cat(calib)}
    X["fc2"] = torch.relu(dense.fc1(X["fc1"])).detach()
    errors = {}
    for refine in (None, "dsnot"):
        model = copy.deepcopy(dense)
        prune_oneshot(model, calib, method="wanda", sparsity=0.7, refine=refine, progress=False)
        assert model.sparsetorch_stats.mode == "one-pass" and model.sparsetorch_stats.refine == refine
        for item in iter_masks(model):
            w0 = dict(dense.named_modules())[item.fqn].weight.detach()
            x = X[item.fqn]
            errors[(refine, item.fqn)] = float(((x @ (w0 - item.module.weight.detach()).T) ** 2).sum())
            assert (~item.mask).sum().item() == round(0.7 * item.mask.numel())
    for name in ("fc1", "fc2"):
        assert errors[("dsnot", name)] <= errors[(None, name)] * (1 + 1e-5)
    assert errors[("dsnot", "fc1")] < 0.99 * errors[(None, "fc1")]
