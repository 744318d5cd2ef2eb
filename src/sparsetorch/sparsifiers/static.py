"""``Static``: sparse from step 0 with a fixed mask (random by distribution, or given)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import SparsityError
from ..core.post_training import compute_masks
from .base import Sparsifier
from .common import check_choice, check_target_sparsity, rescale_by_fan_in

__all__ = ["Static"]

DISTRIBUTIONS = ("uniform", "er", "erk")


class Static(Sparsifier):
    """A fixed sparse topology kept for the whole run.

    Args:
        sparsity: overall fraction of target weights removed.
        distribution: how the density is split across layers: "uniform", "er" or "erk"
            (Evci et al. 2020; small layers get more density).
        masks: keep these masks instead of drawing random ones (``{qualified name: bool tensor}``
            or one per target in order), e.g. from SNIP/GraSP/SynFlow or a lottery ticket.
        reinit: rescale each unit's kept weights by sqrt(fan_in / kept fan_in) after masking
            (sparsity-aware init, Evci et al. 2022) so activations keep their dense scale.
        pattern: "unstructured", "N:M", "block:RxC" or "channel" for the random masks.

    Example::

        sparsifier = Static(sparsity=0.95, distribution="erk", reinit=True).attach(model, optimizer)
    """

    def __init__(self, sparsity: float = 0.9, *, distribution: str = "erk",
                 masks: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
                 reinit: bool = False, pattern: str = "unstructured", **kwargs: Any):
        super().__init__(**kwargs)
        self.sparsity = check_target_sparsity(sparsity)
        self.distribution = check_choice(distribution, DISTRIBUTIONS, "distribution")
        self.masks, self.reinit, self.pattern = masks, bool(reinit), pattern

    def initial_masks(self) -> list[torch.Tensor]:
        if self.masks is not None:
            return self._given_masks()
        return self.score_masks(None)

    def score_masks(self, scores: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Random masks by distribution (``scores=None``) or the global top of ``scores``."""
        if scores is None:
            return compute_masks(self.targets, self.sparsity, method="random", scope="layer",
                                 distribution=self.distribution, pattern=self.pattern, generator=self.generator)
        return compute_masks(self.targets, self.sparsity, scope="global", pattern=self.pattern, scores=scores)

    def _given_masks(self) -> list[torch.Tensor]:
        names = [t.qualified_name for t in self.targets]
        if isinstance(self.masks, Mapping):
            missing = [n for n in names if n not in self.masks]
            if missing:
                raise SparsityError(f"masks= lacks layers {missing[:5]}; give one mask per target layer", missing=missing)
            masks = [self.masks[n] for n in names]
        else:
            masks = list(self.masks)
            if len(masks) != len(names):
                raise SparsityError(f"masks= has {len(masks)} masks for {len(names)} target layers {names[:5]}")
        for t, m in zip(self.targets, masks):
            if tuple(m.shape) != tuple(t.param.shape):
                raise SparsityError(f"mask for {t.qualified_name} has shape {tuple(m.shape)}, the layer has "
                                    f"{tuple(t.param.shape)}", layer=t.qualified_name)
        return [m.detach().to(torch.bool).cpu() for m in masks]

    def attach(self, model, optimizer=None) -> "Static":
        super().attach(model, optimizer)
        if self.reinit:
            rescale_by_fan_in(self.targets)
        return self
