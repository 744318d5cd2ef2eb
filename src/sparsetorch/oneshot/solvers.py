"""The math of one-shot pruning: pure functions over a weight ``W [out, in]`` and input statistics.

Every function returns a keep-mask of ``W``'s shape (True = kept); SparseGPT also returns the
updated weights. Inputs are float32; nothing here touches a module.
"""
from __future__ import annotations

import math
from typing import overload

import torch

from ..core.patterns import Pattern
from ..errors import SparsityError
from ..core.quant_grid import expand_scales
from .quantize import QuantGrid, group_scales, quantize_column

__all__ = ["magnitude_mask", "wanda_mask", "sparsegpt_solve", "row_topk_mask", "inverse_hessian_cholesky"]


def row_topk_mask(scores: torch.Tensor, density: float, pattern: Pattern) -> torch.Tensor:
    """Keep the highest scores of each output row (N:M: the N highest of each M group of a row)."""
    rows, cols = scores.shape  # [out, in]
    if pattern.kind == "nm":
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(groups, pattern.n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    # rows keep floor or ceil of density * cols so that the layer keeps exactly round(density * numel)
    total = density * rows * cols
    edges = torch.tensor([int(round(total * i / rows)) for i in range(rows + 1)], device=scores.device)
    keep = (edges[1:] - edges[:-1])[:, None]  # [out, 1]
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [out, in]
    ranks_kept = torch.arange(cols, device=scores.device)[None, :] < keep  # [out, in], sorted order
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranks_kept)


def layer_topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` highest scores of the whole layer."""
    keep = int(round(density * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep:
        mask[torch.topk(scores.flatten(), keep).indices] = True
    return mask.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, density: float, pattern: Pattern, scope: str = "layer") -> torch.Tensor:
    """The baseline: keep the largest |W| per layer (``scope="layer"``) or per output row."""
    scores = weight.abs()
    if pattern.kind == "nm" or scope == "row":
        return row_topk_mask(scores, density, pattern)
    return layer_topk_mask(scores, density)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, density: float, pattern: Pattern,
               scope: str = "row") -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""
    scores = weight.abs() * input_sq_norm.clamp_min(0).sqrt()[None, :]  # [out, in]
    if pattern.kind == "nm" or scope == "row":
        return row_topk_mask(scores, density, pattern)
    return layer_topk_mask(scores, density)


def mean_diagonal(hessian: torch.Tensor) -> float:
    """mean(diag H), the unit of every damping (1.0 when H is all zeros or not finite)."""
    scale = float(torch.diagonal(hessian).mean())
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def dampened(hessian: torch.Tensor, damp: float, max_tries: int = 6):
    """Yield (H + d * mean(diag H) * I, d) for d = damp, 10 damp, 100 damp, ...: the damping every
    solver retries with until its factorisation succeeds."""
    scale = mean_diagonal(hessian)
    for attempt in range(max_tries):
        d = damp * 10**attempt
        # yielded without a local name: the caller's ``del h`` frees it (a suspended generator holding it would
        # keep one more [in, in] copy alive through the factorisation: 121 MB on a 5504-wide layer)
        yield _with_damping(hessian, d * scale), d


def _with_damping(hessian: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``hessian`` with ``value`` added to its diagonal (no [in, in] identity: 121 MB more at the peak)."""
    h = hessian.clone()
    h.diagonal().add_(value)
    return h


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) of the dampened Hessian, and the damping used.

    H + damp * mean(diag H) * I; if a factorisation fails (a singular or badly scaled H), the
    damping grows tenfold and it retries; as a last resort H is replaced by its diagonal.
    """
    scale = mean_diagonal(hessian)
    for h, d in dampened(hessian, damp, max_tries):
        lower, info = torch.linalg.cholesky_ex(h)
        del h  # each [in, in] temporary goes as soon as the next exists (one-shot's peak memory)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
    # diagonal fallback: OBS without cross terms (pure magnitude-over-curvature selection)
    diag = torch.diagonal(hessian).clamp_min(0) + max(damp, 1e-2) * scale
    return torch.diag(diag.rsqrt()), float("nan")


def _prune_counts(numel_rows: int, cols: int, density: float, block: int) -> list[int]:
    """How many weights each column block prunes so that the layer total is exactly round((1-density)*numel)."""
    total = (1.0 - density) * numel_rows * cols
    edges = list(range(0, cols, block)) + [cols]
    return [int(round(total * b / cols)) - int(round(total * a / cols)) for a, b in zip(edges[:-1], edges[1:])]


@overload
def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern,
                    block_size: int = 128, damp: float = 0.01, *,
                    grid: None = None) -> tuple[torch.Tensor, torch.Tensor, float]: ...


@overload
def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern,
                    block_size: int = 128, damp: float = 0.01, *,
                    grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]: ...


@torch.no_grad()
def sparsegpt_solve(weight, hessian, density, pattern, block_size=128, damp=0.01, *, grid=None):
    """SparseGPT (Frantar & Alistarh 2023): prune ``W [out, in]`` and update the kept weights.

    ``hessian`` is H = 2 X X^T / n ``[in, in]`` of the layer's inputs. Columns are processed
    left to right in blocks; within a block the mask is chosen adaptively by the OBS saliency
    w^2 / [H^-1]_jj^2, each pruned column's error is spread over the later columns of the block
    (row of U, the upper Cholesky factor of H^-1), and the block's accumulated errors update
    the rest of the matrix in one matmul ("lazy batch" update). Returns (new W, keep-mask, damping used).

    With ``grid`` (a ``QuantGrid``), each kept weight is also rounded to the grid when its column is
    processed and the rounding error is spread like a pruning error (GPTQ; SparseGPT section 4); the
    return is then (new W, keep-mask, damping, scales ``[out, n_groups]``), every kept weight exactly
    ``q * scale`` in float32 and every pruned one 0. The scales are fixed before the rounding sweep, by
    a first grid-free sweep: max |w| over each group's kept weights there. (Scales taken from the current
    weights when the sweep reaches a group's first column undershoot: the pruning updates that follow grow
    the kept weights past them, and the clamping lost to prune-then-round by up to 2x at 2:4, group 128.)
    The rounding sweep's result is returned unless the first sweep's weights rounded to nearest (what
    ``round_to_nearest`` gives) have a smaller tr(D H D^T), so the answer is never worse than
    prune-then-round on the calibration data. Costs two sweeps. ``grid=None`` is SparseGPT exactly as before.
    """
    if grid is not None and not isinstance(grid, QuantGrid):
        raise SparsityError(f"grid must be a QuantGrid(bits, group_size) or None, got {type(grid).__name__}")
    W = weight.float().clone(memory_format=torch.contiguous_format)  # [out, in]
    rows, cols = W.shape
    if grid is not None:
        grid.width(cols)  # a group wider than the layer is an error before any work
    U, used_damp = inverse_hessian_cholesky(_without_dead_inputs(W, hessian.float()), damp)
    if pattern.kind == "nm":
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    counts = _prune_counts(rows, cols, density, block_size)
    if grid is None:
        keep = _sweep(W, U, pattern, block_size, counts)
        return _finite_or_masked(W, weight, keep), keep, used_damp
    W0 = W.clone()
    keep0 = _sweep(W0, U, pattern, block_size, counts)  # where the weights go without rounding
    W0 = _finite_or_masked(W0, weight, keep0)
    scales = group_scales(W0, keep0, grid)  # [out, n_groups]
    full = expand_scales(scales, grid.width(cols), cols)  # [out, in]
    keep = _sweep(W, U, pattern, block_size, counts, (full, grid.qmax))
    rounded = quantize_column(W0, full, grid.qmax)  # the candidate without error feedback: round_to_nearest
    if not torch.isfinite(W).all() or _output_error(weight, W, hessian) > _output_error(weight, rounded, hessian):
        W, keep = rounded, keep0
    return W, keep, used_damp, scales


def _without_dead_inputs(W: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Inputs that were always zero carry no information: their weights in ``W`` are zeroed (pruned first) and
    their diagonal entries set to 1 in a copy of ``hessian``; without any, ``hessian`` itself (not copied:
    the factorisation only reads it, and a copy is [in, in] more at the peak)."""
    dead = torch.diagonal(hessian) <= 0
    if not bool(dead.any()):
        return hessian
    H = hessian.clone(memory_format=torch.contiguous_format)  # [in, in]
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return H


def _output_error(weight: torch.Tensor, new_w: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T) for D = W - W': the calibration outputs' squared error, up to the factor 2/n."""
    diff = weight.float() - new_w
    return float(((diff @ hessian.float()) * diff).sum())


def _finite_or_masked(W: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W``, or when the sweep produced inf/NaN the OBS-selected mask on the original weights, without updates."""
    if torch.isfinite(W).all():
        return W
    return torch.nan_to_num(weight.float() * keep, nan=0.0, posinf=0.0, neginf=0.0)


def _sweep(W: torch.Tensor, U: torch.Tensor, pattern: Pattern, block_size: int, counts: list[int],
           quant: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """The SparseGPT sweep over ``W`` in place (pruned weights end 0); returns the keep-mask. With ``quant`` =
    (scale per weight ``[out, in]``, qmax), each kept weight is rounded to its grid as its column is processed."""
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    for k, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # [out, B]
        U1 = U[i1:i2, i1:i2]  # [B, B]
        err1 = torch.zeros_like(W1)
        diag1 = torch.diagonal(U1).square()[None, :]  # [1, B]
        prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        if pattern.kind != "nm" and counts[k]:
            saliency = (W1.square() / diag1).flatten()  # [out * B], all rows compete: adaptive mask
            prune1.view(-1)[torch.topk(saliency, counts[k], largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:  # choose each group on the already-updated weights
                j = slice(i, i + pattern.m)
                prune1[:, j] = ~row_topk_mask(W1[:, j].square() / diag1[:, j], 0.0, pattern)
            w = W1[:, i]  # [out]
            kept = w if quant is None else quantize_column(w, quant[0][:, i1 + i], quant[1])
            q = torch.where(prune1[:, i], torch.zeros_like(w), kept)
            e = (w - q) / U1[i, i]  # [out]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    W[~keep] = 0.0
    return keep
