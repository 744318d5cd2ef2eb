"""ALPS: the support refit equals a direct solve, and the solver beats SparseGPT's reconstruction error."""
import itertools

import pytest
import torch

from sparsetorch.core.patterns import is_valid_mask, parse_pattern
from sparsetorch.oneshot.alps import alps_solve, backsolve_on_support
from sparsetorch.oneshot.solvers import sparsegpt_solve


def _problem(seed, rows=32, d=64, n=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return torch.randn(rows, d, generator=g), 2 * X.T @ X / n


def _err(W, Wn, H):
    D = W - Wn
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def test_backsolve_matches_a_direct_solve_per_row():
    W, H = _problem(0, rows=6, d=24)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(W.shape, generator=g) < 0.5
    got = backsolve_on_support(W, H, keep, iterations=200, tol=1e-10)
    for r in range(W.shape[0]):
        s = keep[r]
        want = torch.linalg.solve(H[s][:, s].double(), (H.double() @ W[r].double())[s])
        assert torch.allclose(got[r, s].double(), want, rtol=1e-3, atol=1e-4)
        assert torch.all(got[r, ~s] == 0)


def _brute_force(W, H, keep_n):
    """The exact optimum of a one-row layer: every support of ``keep_n`` inputs, each solved directly."""
    d, best = W.shape[1], float("inf")
    for kept in itertools.combinations(range(d), keep_n):
        s = torch.zeros(d, dtype=torch.bool)
        s[list(kept)] = True
        w = torch.zeros(d, dtype=torch.float64)
        w[s] = torch.linalg.solve(H[s][:, s].double(), (H.double() @ W[0].double())[s])
        best = min(best, _err(W.double(), w[None], H.double()))
    return best


def test_alps_is_near_the_exact_optimum_of_tiny_layers():
    """ADMM on an l0 set is a heuristic: within 10% of the brute-force optimum, never worse than SparseGPT."""
    for seed in range(4):
        W, H = _problem(seed, rows=1, d=8, n=64)
        best = _brute_force(W, H, 4)
        new_w, keep, _ = alps_solve(W, H, 0.5, parse_pattern("unstructured"), iterations=50)
        sg, _, _ = sparsegpt_solve(W, H, 0.5, parse_pattern("unstructured"))
        assert int(keep.sum()) == 4
        assert best - 1e-9 <= _err(W, new_w, H) <= best * 1.10
        assert _err(W, new_w, H) <= _err(W, sg, H) + 1e-9


@pytest.mark.parametrize("density,pattern", [(0.3, "unstructured"), (0.2, "unstructured"), (None, "2:4")])
def test_alps_beats_sparsegpt_on_correlated_inputs(density, pattern):
    pat = parse_pattern(pattern)
    density = density if density is not None else pat.n / pat.m
    for seed in range(3):
        W, H = _problem(seed)
        a, keep, info = alps_solve(W, H, density, pat)
        b, _, _ = sparsegpt_solve(W, H, density, pat)
        assert _err(W, a, H) <= _err(W, b, H)
        assert torch.all(a[~keep] == 0) and not info["fallback"]
        if pat.kind == "nm":
            assert is_valid_mask(keep, pat) and int(keep.sum()) * pat.m == pat.n * keep.numel()
        else:
            assert int((~keep).sum()) == round((1 - density) * keep.numel())


def test_alps_is_deterministic_and_survives_dead_inputs():
    W, H = _problem(4)
    H[:, :5] = 0
    H[:5, :] = 0  # five inputs that were always zero
    a = alps_solve(W, H, 0.3, parse_pattern("unstructured"))
    b = alps_solve(W, H, 0.3, parse_pattern("unstructured"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(a[0]).all()
