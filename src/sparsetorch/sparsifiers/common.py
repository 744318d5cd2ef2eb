"""Small pieces the training-time methods share: validation, move counting, sparse re-init."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import SparsityError, check_sparsity
from ..masks import get_mask
from ..patterns import as_2d
from ..selection import Target

__all__ = ["moves", "rescale_by_fan_in", "check_target_sparsity", "check_choice"]


def moves(old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(dropped, grown)``: connections removed and added going from ``old`` to ``new`` masks."""
    dropped = grown = 0
    for a, b in zip(old, new):
        a, b = a.to(b.device), b
        dropped += int((a & ~b).sum())
        grown += int((b & ~a).sum())
    return dropped, grown


@torch.no_grad()
def rescale_by_fan_in(targets: Sequence[Target]) -> None:
    """Sparsity-aware init: scale each output unit's weights by sqrt(fan_in / kept fan_in).

    Evci et al. 2022 ("Gradient flow in sparse neural networks"): a dense init's variance
    1/fan_in is too small once most inputs are pruned; rescaling by the kept fan-in restores
    the variance of each unit's pre-activation.
    """
    for t in targets:
        w2 = as_2d(t.param.data)  # [out, fan_in]
        mask = get_mask(t.module, t.name)
        kept2 = as_2d(mask) if mask is not None else torch.ones_like(w2, dtype=torch.bool)
        kept = kept2.sum(dim=1, keepdim=True).clamp(min=1)  # [out, 1]
        w2.mul_(torch.sqrt(w2.shape[1] / kept.to(w2.dtype)))


def check_target_sparsity(sparsity: float) -> float:
    """A training target sparsity in (0, 1)."""
    value = check_sparsity(sparsity)
    if value <= 0.0:
        raise SparsityError(f"sparsity must be above 0 for a sparse training method, got {sparsity}", sparsity=sparsity)
    return value


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise SparsityError(f"unknown {what} {value!r}; choose one of {list(choices)}", **{what: value})
    return value


def rows_cols(shape: torch.Size) -> tuple[int, int]:
    """``[out, fan_in]`` of the 2-D view every pattern works on."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
