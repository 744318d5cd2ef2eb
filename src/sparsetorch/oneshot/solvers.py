"""The math of one-shot pruning: pure functions over a weight ``W [out, in]`` and input statistics.

Every function returns a keep-mask of ``W``'s shape (True = kept); SparseGPT also returns the
updated weights. Inputs are float32; nothing here touches a module.
"""
from __future__ import annotations

import math

import torch

from ..core.patterns import Pattern

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


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) of the dampened Hessian, and the damping used.

    H + damp * mean(diag H) * I; if a factorisation fails (a singular or badly scaled H), the
    damping grows tenfold and it retries; as a last resort H is replaced by its diagonal.
    """
    cols = hessian.shape[0]
    eye = torch.eye(cols, dtype=hessian.dtype, device=hessian.device)
    scale = float(torch.diagonal(hessian).mean())
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    for attempt in range(max_tries):
        d = damp * 10**attempt
        h = hessian + (d * scale) * eye
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
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


@torch.no_grad()
def sparsegpt_solve(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern,
                    block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT (Frantar & Alistarh 2023): prune ``W [out, in]`` and update the kept weights.

    ``hessian`` is H = 2 X X^T / n ``[in, in]`` of the layer's inputs. Columns are processed
    left to right in blocks; within a block the mask is chosen adaptively by the OBS saliency
    w^2 / [H^-1]_jj^2, each pruned column's error is spread over the later columns of the block
    (row of U, the upper Cholesky factor of H^-1), and the block's accumulated errors update
    the rest of the matrix in one matmul ("lazy batch" update). Returns (new W, keep-mask, damping used).
    """
    W = weight.float().clone(memory_format=torch.contiguous_format)  # [out, in]
    H = hessian.float().clone(memory_format=torch.contiguous_format)  # [in, in]
    rows, cols = W.shape
    dead = torch.diagonal(H) <= 0  # inputs that were always zero: no information, prune them first
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, used_damp = inverse_hessian_cholesky(H, damp)
    if pattern.kind == "nm":
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    counts = _prune_counts(rows, cols, density, block_size)
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
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            e = (w - q) / U1[i, i]  # [out]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    W[~keep] = 0.0
    if not torch.isfinite(W).all():  # never hand back NaN: fall back to the OBS-selected mask without updates
        W = weight.float() * keep
        W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
    return W, keep, used_damp
