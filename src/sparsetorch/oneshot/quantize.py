"""Joint sparsification + quantization (SparseGPT section 4, GPTQ): symmetric integer grids over ``W [out, in]``.

A grid (``QuantGrid(bits, group_size)``) has one scale per output row and group of ``group_size`` consecutive
input columns (None: one per row): ``scale = max |w| over the group's kept weights / qmax`` (qmax 127 for 8
bits, 7 for 4), and a weight on it is ``q * scale`` with an integer ``q`` in ``[-qmax, qmax]``. Zero is on the
grid, so pruned weights are. Pure functions, float32; ``sparsegpt_solve(..., grid=)`` quantizes while it
prunes (with error feedback), ``round_to_nearest`` is the prune-then-round baseline.
"""
from __future__ import annotations

import torch

from ..core.quant_grid import QuantGrid, expand_scales, grid_codes

__all__ = ["QuantGrid", "group_scales", "quantize_to_grid", "quantize_column", "round_to_nearest", "grid_codes"]


def group_scales(weight: torch.Tensor, keep: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Scales ``[out, n_groups]``: max |w| over each group's kept weights / qmax (0 for a group keeping none)."""
    rows, cols = weight.shape
    width, groups = grid.width(cols), grid.n_groups(cols)
    a = torch.where(keep.to(device=weight.device, dtype=torch.bool), weight.detach().float().abs(),
                    torch.zeros((), dtype=torch.float32, device=weight.device))  # [out, in]
    a = torch.nn.functional.pad(a, (0, groups * width - cols))  # [out, groups * width]
    return a.reshape(rows, groups, width).amax(dim=2) / grid.qmax


def quantize_to_grid(weight: torch.Tensor, scales: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """``weight [out, in]`` rounded to the nearest grid point, float32: ``q * scale`` with integer ``q`` in
    ``[-qmax, qmax]`` (clamped), 0 where the scale is 0."""
    cols = weight.shape[1]
    full = expand_scales(scales.float(), grid.width(cols), cols)  # [out, in]
    return quantize_column(weight.detach().float(), full, grid.qmax)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``w`` to the grid of ``scale`` (same shape, or broadcastable): the one rounding every caller shares, so
    a weight quantized anywhere is the same float32 bits (a weight rounding to 0 is +0.0, as decoding gives)."""
    q = (w / scale.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(-qmax, qmax) + 0.0  # -0.0 -> 0.0
    return torch.where(scale > 0, q * scale, torch.zeros_like(w))


def round_to_nearest(weight: torch.Tensor, keep: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: prune (zero where ``keep`` is False), then round each kept weight to the nearest point of
    the grid its group's kept weights define. Returns ``(weight on the grid, scales [out, n_groups])``."""
    keep = keep.to(device=weight.device, dtype=torch.bool)
    w = torch.where(keep, weight.detach().float(), torch.zeros((), dtype=torch.float32, device=weight.device))
    scales = group_scales(w, keep, grid)
    return quantize_to_grid(w, scales, grid), scales
