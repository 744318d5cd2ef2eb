"""Importance scores: higher means more worth keeping. Pure functions over tensors."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SparsityError
from .rng import resolve_generator

__all__ = ["magnitude", "random", "gradient", "SCORES", "register_score"]

SCORES: dict[str, Callable[..., torch.Tensor]] = {}


def register_score(name: str):
    def deco(fn):
        SCORES[name] = fn
        return fn

    return deco


@register_score("magnitude")
def magnitude(weight: torch.Tensor, **_: object) -> torch.Tensor:
    """|w| (Han et al. 2015)."""
    return weight.detach().abs()


@register_score("random")
def random(weight: torch.Tensor, *, generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
    """Uniform noise: the baseline every other score must beat."""
    return torch.rand(weight.shape, generator=resolve_generator(generator), dtype=torch.float32)


@register_score("gradient")
def gradient(weight: torch.Tensor, *, grad: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """|w * dL/dw|: first-order Taylor estimate of the loss change when w is removed (Molchanov et al. 2017)."""
    if grad is None:
        raise SparsityError("the gradient score needs grad=; pass batch=(x, y) to prune() so it can compute one")
    return (weight.detach() * grad.detach()).abs()
