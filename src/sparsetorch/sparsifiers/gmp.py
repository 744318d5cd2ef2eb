"""``GMP``: gradual magnitude pruning on the cubic schedule of Zhu & Gupta 2017."""
from __future__ import annotations

from typing import Any

import torch

from ..core import schedules
from ..errors import SparsityError, check_sparsity
from ..core.patterns import parse_pattern
from ..core.post_training import compute_masks
from .base import Sparsifier
from .common import check_choice, check_target_sparsity

__all__ = ["GMP"]


class GMP(Sparsifier):
    """Prune the smallest weights a little at a time while training, dense to ``sparsity``.

    Every ``every`` steps from ``start`` to ``end`` the sparsity follows
    ``schedules.cubic`` from ``initial_sparsity`` to ``sparsity``; pruned weights stay pruned.

    Args:
        sparsity: final fraction of target weights removed (N:M patterns fix it at 1 - N/M).
        initial_sparsity: the sparsity applied at ``start``.
        start / end: first and last pruning step (steps count ``sparsifier.step()`` calls).
        every: pruning frequency in steps.
        scope: "global" ranks all layers' magnitudes together; "layer" prunes each layer to the
            schedule's sparsity split by ``distribution``.
        pattern: "unstructured", "N:M", "block:RxC" or "channel". N:M ramps the kept count per
            group (4:4 -> 3:4 -> 2:4) on the same cubic schedule.

    Example::

        sparsifier = GMP(sparsity=0.9, start=0, end=3000, every=100).attach(model, optimizer)
    """

    def __init__(self, sparsity: float | None = 0.9, *, initial_sparsity: float = 0.0, start: int = 0,
                 end: int = 1000, every: int = 100, scope: str = "global", pattern: str = "unstructured",
                 distribution: str = "uniform", **kwargs: Any):
        super().__init__(**kwargs)
        self.pattern = parse_pattern(pattern)
        fixed = self.pattern.fixed_density
        self.sparsity = check_target_sparsity(1.0 - fixed if fixed is not None and sparsity is None else sparsity)
        if fixed is not None and abs(self.sparsity - (1.0 - fixed)) > 1e-9:
            raise SparsityError(f"pattern '{self.pattern}' fixes sparsity at {1 - fixed:g}, got sparsity={sparsity}; "
                                "pass sparsity=None or the matching value")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SparsityError(f"initial_sparsity={initial_sparsity} is above the final sparsity={sparsity}; "
                                "GMP only prunes more over time")
        self.start, self.end = schedules.check_window(start, end, "GMP schedule")
        self.every = schedules.check_every(every)
        self.scope = check_choice(scope, ("global", "layer"), "scope")
        self.distribution = distribution

    def target_sparsity(self, step: int) -> float:
        """The schedule's sparsity at ``step`` (0 before ``start``)."""
        if step < self.start:
            return 0.0
        return schedules.cubic(step, initial=self.initial_sparsity, final=self.sparsity,
                               start=self.start, end=self.end, every=self.every)

    def initial_masks(self) -> list[torch.Tensor]:
        if self.start == 0 and self.initial_sparsity > 0:
            return self._masks(self.initial_sparsity)
        return super().initial_masks()

    def update(self, step: int) -> None:
        on_schedule = self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)
        if not on_schedule:
            return
        sparsity = self.target_sparsity(step)
        if sparsity <= 0.0:
            return
        # "moved" counts changed connections; pruning only drops, so it is the dropped count
        self.set_masks(self._masks(sparsity), sparsity=sparsity, moves="max")

    def _masks(self, sparsity: float) -> list[torch.Tensor]:
        if self.pattern.kind == "nm":
            return self._nm_masks(sparsity)
        return compute_masks(self.targets, sparsity, method="magnitude", scope=self.scope, pattern=self.pattern,
                             distribution=self.distribution)

    def _nm_masks(self, sparsity: float) -> list[torch.Tensor]:
        # keep k of every m with k stepping from m down to n as the schedule's density falls
        m = self.pattern.m
        k = min(m, max(self.pattern.n, round((1.0 - sparsity) * m)))
        if k == m:
            return [self.current_mask(i) for i in range(len(self.targets))]
        return compute_masks(self.targets, None, method="magnitude", scope="layer", pattern=f"{k}:{m}")
