"""Small pieces the training-time methods share: validation, move counting, sparse re-init."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core import schedules
from ..errors import SparsityError, check_sparsity
from ..core.distributed import local
from ..core.masks import get_mask
from ..core.patterns import as_2d
from ..core.layer_selection import Target

__all__ = ["moves", "rescale_by_fan_in", "check_target_sparsity", "check_choice", "DropGrowSchedule"]


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
        w2 = as_2d(local(t.param.data))  # [out, fan_in]; FSDP2 shards rows, so a shard holds whole rows
        mask = get_mask(t.module, t.name)
        kept2 = as_2d(local(mask)) if mask is not None else torch.ones_like(w2, dtype=torch.bool)
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


class DropGrowSchedule:
    """When drop-and-grow updates happen and what fraction they move (SET/RigL, Evci et al. 2020):
    every ``every`` steps before ``end``, the fraction cosine-decayed (or constant) to 0 at ``end``.
    Mixed into the masked (``sparsifiers.dst``) and compressed (``sparse_training.dynamic``) methods."""

    every: int
    drop_fraction: float
    decay: str
    end: int | None

    def set_schedule(self, every: int, drop_fraction: float, decay: str, end: int | None) -> None:
        self.every = schedules.check_every(every)
        self.drop_fraction = schedules.check_fraction(drop_fraction)
        self.decay = check_choice(decay, ("cosine", "constant"), "decay")
        if end is not None:
            schedules.check_window(0, end, f"{type(self).__name__} update schedule")
        self.end = None if end is None else int(end)

    def is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.every == 0 and (self.end is None or step < self.end)

    def fraction(self, step: int) -> float:
        """The drop fraction at ``step``."""
        if self.end is None or self.decay == "constant":
            return self.drop_fraction if self.end is None or step < self.end else 0.0
        return schedules.cosine_decay(step, initial=self.drop_fraction, end=self.end)
