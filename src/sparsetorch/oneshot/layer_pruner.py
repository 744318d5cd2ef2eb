"""One layer, pruned: its input statistics go through the method's score or solver, then the optional
refinement and quantization, and the result is installed as a sparsetorch mask.

A ``Recipe`` is what ``prune_oneshot`` was asked to do, validated once; ``LayerPruner`` applies it to
one layer at a time. The math itself lives in pure functions (``solvers``, ``owl`` ...).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.masks import set_input_order, set_mask
from ..core.quant_grid import set_quant_grid
from ..core.patterns import Pattern
from . import solvers
from .linear_layers import InputStats, is_transposed, to_param_layout, weight_2d
from .alps import alps_solve
from .dsnot import dsnot_refine
from .heap import return_freed_memory
from .quantize import QuantGrid, round_to_nearest
from .ria import ria_mask
from .results import LayerResult

# method -> whether it needs calibration data, whether it needs the Hessian X^T X
METHOD_NEEDS = {
    "magnitude": (False, False),
    "wanda": (True, False),
    "ria": (True, False),
    "sparsegpt": (True, True),
    "alps": (True, True),
}


@dataclass(frozen=True)
class Recipe:
    """A validated one-shot request: the method, its pattern and the method's own knobs."""

    method: str
    pattern: Pattern
    scope: str | None = None  # magnitude/wanda: where weights compete, "layer" or "row"
    block_size: int = 128  # SparseGPT's column block
    damp: float = 0.01  # Hessian damping, a fraction of its mean diagonal
    permute: bool = False  # RIA's input-channel permutation for N:M
    grid: QuantGrid | None = None  # kept weights quantized: jointly by SparseGPT, else rounded to nearest
    refine: str | None = None  # "dsnot": prune-and-grow swaps after the method, before quantization

    @property
    def needs_data(self) -> bool:
        return METHOD_NEEDS[self.method][0] or self.refine is not None

    @property
    def needs_hessian(self) -> bool:  # DSnoT accepts a swap only if it lowers the exact error, from H
        return METHOD_NEEDS[self.method][1] or self.refine is not None


class LayerPruner:
    """Turns one layer plus its input statistics into new weights and a mask, and installs them."""

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.recipe, self.device = recipe, device

    @torch.no_grad()
    def prune(self, name: str, module: nn.Module, stats: InputStats | None, density: float,
              note: str = "") -> LayerResult:
        t0 = time.perf_counter()
        return_freed_memory()  # the last layer's temporaries, out of this layer's peak
        W = weight_2d(module).detach().to(self.device, torch.float32)  # [out, in]
        result = LayerResult(name, 0.0, 0.0, numel=W.numel(), target=1.0 - density, note=note)
        self.order, self.scales = None, None
        has_data = stats is not None and stats.count > 0
        hessian = stats.take_hessian() if has_data and stats.has_hessian else None  # [in, in], once per layer
        if not has_data:  # weights only (magnitude, or a layer no token reached)
            keep, new_w = solvers.magnitude_mask(W, density, self.recipe.pattern, self.recipe.scope or "layer"), None
        else:
            new_w, keep = self._solve(W, stats, hessian, density, result, transposed=is_transposed(module))
        if self.recipe.refine is not None and has_data:
            new_w, keep = self._refine(W, new_w, keep, stats, hessian, result)
        if self.recipe.grid is not None and self.scales is None:  # prune, then round to nearest
            new_w, self.scales = round_to_nearest(W * keep if new_w is None else new_w, keep, self.recipe.grid)
        if hessian is not None:
            result.rel_error = relative_error(W, W * keep if new_w is None else new_w, hessian)
        if new_w is not None:
            module.weight.copy_(to_param_layout(module, new_w).to(module.weight.device, module.weight.dtype))
        set_mask(module, to_param_layout(module, keep).to(module.weight.device))
        if self.order is not None:
            set_input_order(module, self.order.to(module.weight.device))
        if self.scales is not None:
            set_quant_grid(module, self.scales, self.recipe.grid, transposed=is_transposed(module))
        result.sparsity = 1.0 - float(keep.float().mean())
        result.seconds = time.perf_counter() - t0
        return result

    def _refine(self, W: torch.Tensor, new_w: torch.Tensor | None, keep: torch.Tensor, stats: InputStats,
                hessian: torch.Tensor, result: LayerResult) -> tuple[torch.Tensor, torch.Tensor]:
        """DSnoT on the method's result: swaps that lower ||(W - W')X||^2, regrown weights at their dense value."""
        current = W * keep if new_w is None else new_w
        p = self.order if self.order is not None else slice(None)  # N:M groups along RIA's input order
        refined, kept, info = dsnot_refine(W[:, p], current[:, p], keep[:, p], x_mean=stats.mean()[p],
                                           x_sq_norm=stats.sq_norm[p], hessian=hessian[p][:, p],
                                           pattern=self.recipe.pattern)
        if self.order is not None:
            refined, keep = torch.empty_like(refined).index_copy_(1, self.order, refined), \
                torch.empty_like(kept).index_copy_(1, self.order, kept)
        else:
            keep = kept
        result.note = (result.note + "; " if result.note else "") + f"dsnot: {info['swaps']} swaps"
        return refined, keep

    def _solve(self, W: torch.Tensor, stats: InputStats, hessian: torch.Tensor | None, density: float,
               result: LayerResult, transposed: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(new weights or None when only masked, keep-mask) for the recipe's method."""
        r = self.recipe
        if r.method == "magnitude":
            return None, solvers.magnitude_mask(W, density, r.pattern, r.scope or "layer")
        if r.method == "wanda":
            return None, solvers.wanda_mask(W, stats.sq_norm, density, r.pattern, r.scope or "row")
        if r.method == "ria":
            # an input order is recorded on [out, in] weights only; a transposed Conv1D keeps N:M in place
            permute = r.permute and not transposed
            if r.permute and transposed:
                result.note = "Conv1D weight: pruned without the channel permutation"
            keep, self.order = ria_mask(W, stats.sq_norm, density, r.pattern, permute=permute, scope=r.scope or "row")
            return None, keep
        if r.method == "alps":  # ADMM + PCG on the support; a grid is applied after (round to nearest)
            new_w, keep, info = alps_solve(W, hessian, density, r.pattern, damp=r.damp)
            result.damp = info["damp"]
            return new_w, keep
        # with DSnoT, quantization waits until the mask has moved (a regrown weight is off the grid)
        if r.grid is None or r.refine is not None:
            new_w, keep, result.damp = solvers.sparsegpt_solve(W, hessian, density, r.pattern, r.block_size, r.damp)
        else:  # the mask and the quantization chosen in the same pass (SparseGPT section 4)
            new_w, keep, result.damp, self.scales = solvers.sparsegpt_solve(
                W, hessian, density, r.pattern, r.block_size, r.damp, grid=r.grid)
        return new_w, keep


def relative_error(W: torch.Tensor, new_w: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W')X||^2 / ||WX||^2 = tr(D H D^T) / tr(W H W^T) for H = 2 X^T X / n."""
    diff = W - new_w
    base = float(((W @ hessian) * W).sum())
    return float(((diff @ hessian) * diff).sum()) / base if base > 0 else 0.0
