"""Mask dynamics over training: what moved, what regrowth survived, when the topology settled."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.masks import iter_masks
from ..errors import SparsityError

__all__ = ["MaskRecorder", "MaskDynamics", "mask_dynamics"]


class MaskRecorder:
    """Keeps a bit-packed copy of every mask at chosen steps (about numel/8 bytes per snapshot).

    Call ``recorder.record(step)`` after a sparsifier update (or every N steps); then
    ``mask_dynamics(recorder.snapshots, recorder.steps)``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.steps: list[int] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def record(self, step: int) -> None:
        self.steps.append(int(step))
        self.snapshots.append({m.qualified_name: m.mask.detach().cpu().clone() for m in iter_masks(self.model)})


@dataclass
class MaskDynamics:
    steps: list[int]
    dropped: list[int]  # connections removed at each update (vs the previous snapshot)
    grown: list[int]  # connections added at each update
    grown_surviving: list[int]  # of those grown at update i, how many are still kept at the last snapshot
    stable_from: int | None  # first step after which no update moves more than `tolerance` of kept connections
    per_layer_moved: dict[str, list[int]] = field(default_factory=dict)

    @property
    def survival_rate(self) -> float:
        grown = sum(self.grown)
        return sum(self.grown_surviving) / grown if grown else float("nan")


def mask_dynamics(snapshots: Sequence[dict[str, torch.Tensor]], steps: Sequence[int], tolerance: float = 0.01) -> MaskDynamics:
    """Compare consecutive mask snapshots (``{layer: bool mask}``, taken at ``steps``)."""
    if len(snapshots) != len(steps) or len(snapshots) < 2:
        raise SparsityError("mask_dynamics needs at least two snapshots and one step per snapshot; "
                            "record more steps with MaskRecorder before calling it")
    names = list(snapshots[0])
    final = snapshots[-1]
    dropped, grown, surviving, moved_frac = [], [], [], []
    per_layer: dict[str, list[int]] = {n: [] for n in names}
    for prev, cur in zip(snapshots[:-1], snapshots[1:]):
        d = g = s = kept = 0
        for n in names:
            new = cur[n] & ~prev[n]
            gone = prev[n] & ~cur[n]
            d, g = d + int(gone.sum()), g + int(new.sum())
            s += int((new & final[n]).sum())
            kept += int(cur[n].sum())
            per_layer[n].append(int(new.sum()))
        dropped.append(d)
        grown.append(g)
        surviving.append(s)
        moved_frac.append(g / max(kept, 1))
    stable_from = None
    for i in range(len(moved_frac)):
        if all(f <= tolerance for f in moved_frac[i:]):
            stable_from = int(steps[i])  # the snapshot before the first quiet update
            break
    return MaskDynamics(list(steps[1:]), dropped, grown, surviving, stable_from, per_layer)
