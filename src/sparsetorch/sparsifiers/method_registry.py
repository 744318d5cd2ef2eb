"""Every training-time method by name, with small default hyperparameters.

``METHODS[name](**overrides)`` builds an unattached sparsifier; the defaults suit a few dozen
steps on a small model (tests, the ``sparsetorch train`` command scales them to the run).
``NEEDS_BATCH`` lists the methods that need ``batch=`` and ``NEEDS_INPUTS`` those that need
``example_inputs=``. Each entry has a ``prepare(model, generator=None)`` hook that readies a dense model
for it: the identity for the masked methods, ``sparsetorch.to_sparse_training`` at the entry's sparsity for
the compressed ones ("compressed-set", "compressed-rigl", "compressed-srigl"; ``entry.compressed`` is True).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from .base import Sparsifier
from .compressed import CompressedRigL, CompressedSET, CompressedSRigL
from .dynamic import SET, RigL, SRigL
from .gmp import GMP
from .at_init import SNIP, GraSP, SynFlow
from .lottery import LotteryTicket
from .static import Static

__all__ = ["METHODS", "NEEDS_BATCH", "NEEDS_INPUTS", "MethodEntry", "make_sparsifier", "for_run", "MASKED"]


class MethodEntry:
    """A registered method: ``entry(**overrides)`` builds an unattached sparsifier with the entry's defaults;
    ``entry.prepare(model)`` readies a dense model for it (compressed methods need SparseLinear layers)."""

    def __init__(self, cls: type[Sparsifier], *, compressed: bool = False, **defaults: Any):
        self.cls, self.compressed, self.defaults = cls, compressed, defaults
        self.__doc__ = f"{cls.__name__} with defaults {defaults}"

    def __call__(self, **overrides: Any) -> Sparsifier:
        return self.cls(**{**self.defaults, **overrides})

    def prepare(self, model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
        """``model`` ready for ``attach``: unchanged, or converted by ``to_sparse_training`` (compressed)."""
        if not self.compressed:
            return model
        from ..sparse_training.layer_swap import to_sparse_training

        return to_sparse_training(model, sparsity=self.defaults.get("sparsity", 0.9),
                                  distribution=self.defaults.get("distribution", "erk"),
                                  generator=generator if generator is not None else torch.Generator().manual_seed(0))

    def __repr__(self) -> str:
        return f"MethodEntry({self.cls.__name__}, compressed={self.compressed}, defaults={self.defaults})"


_factory = MethodEntry


METHODS: dict[str, MethodEntry] = {
    "gmp": _factory(GMP, sparsity=0.9, start=0, end=10, every=2),
    "static": _factory(Static, sparsity=0.9, distribution="erk"),
    "set": _factory(SET, sparsity=0.9, distribution="erk", every=2, drop_fraction=0.3, end=16),
    "rigl": _factory(RigL, sparsity=0.9, distribution="erk", every=2, drop_fraction=0.3, end=16),
    "srigl": _factory(SRigL, sparsity=0.9, distribution="erk", every=2, drop_fraction=0.3, end=16),
    "snip": _factory(SNIP, sparsity=0.9),
    "grasp": _factory(GraSP, sparsity=0.9),
    "synflow": _factory(SynFlow, sparsity=0.9, rounds=10),
    "lottery": _factory(LotteryTicket, sparsity=0.9, rounds=2, rewind_step=2),
    "compressed-set": _factory(CompressedSET, compressed=True, sparsity=0.9, distribution="erk", every=2,
                               drop_fraction=0.3, end=16),
    "compressed-rigl": _factory(CompressedRigL, compressed=True, sparsity=0.9, distribution="erk", every=2,
                                drop_fraction=0.3, end=16),
    "compressed-srigl": _factory(CompressedSRigL, compressed=True, sparsity=0.9, distribution="erk", every=2,
                                 drop_fraction=0.3, end=16),
}
MASKED = tuple(name for name, entry in METHODS.items() if not entry.compressed)
NEEDS_BATCH = ("snip", "grasp")
NEEDS_INPUTS = ("synflow",)


def make_sparsifier(name: str, *, compressed: bool = False, **overrides: Any) -> Sparsifier:
    """Build method ``name`` (case-insensitive) with its defaults updated by ``overrides``.

    ``compressed=True``: "set"/"rigl"/"srigl" for a model converted by ``sparsetorch.to_sparse_training``
    (SparseLinear layers, no dense weights or masks): ``sparse_training.CompressedSET`` / ``CompressedRigL`` /
    ``CompressedSRigL``, same
    hyperparameters (``sparsity``/``distribution`` are then checked against the layers, not applied).
    """
    key = name.lower()
    if compressed:
        classes = {"set": CompressedSET, "rigl": CompressedRigL, "srigl": CompressedSRigL}
        if key not in classes:
            raise SparsityError(f"no compressed variant of {name!r}; choose one of {sorted(classes)} or use "
                                "compressed=False on a dense model", method=name)
        return classes[key](**{"every": 2, "drop_fraction": 0.3, "end": 16, **overrides})
    if key not in METHODS:
        raise SparsityError(f"unknown sparse training method {name!r}; choose one of {sorted(METHODS)}", method=name)
    return METHODS[key](**overrides)


def for_run(name: str, *, sparsity: float, total_steps: int, **overrides: Any) -> dict[str, Any]:
    """Hyperparameters of method ``name`` scaled to a run of ``total_steps`` optimizer steps.

    The papers' recipes as fractions of the run: GMP prunes from 10% to 70% of training about
    50 times (Zhu & Gupta 2017); SET/RigL/SRigL update about 25 times (a new connection needs
    some steps to grow before it is judged) and stop at 75% with an initial drop fraction of
    0.3, cosine-decayed (Evci et al. 2020); SynFlow runs 100 rounds.
    ``overrides`` win. The result is what ``make_sparsifier(name, **result)`` takes.
    """
    key = name.lower()
    steps = max(int(total_steps), 2)
    kwargs: dict[str, Any] = {"sparsity": sparsity}
    if key == "gmp":
        start, end = int(0.1 * steps), max(int(0.7 * steps), int(0.1 * steps) + 1)
        kwargs.update(start=start, end=end, every=max(1, (end - start) // 50))
    elif key.removeprefix("compressed-") in ("set", "rigl", "srigl"):
        end = max(int(0.75 * steps), 2)
        kwargs.update(every=max(1, end // 25), end=end, drop_fraction=0.3, distribution="erk")
    elif key == "static":
        kwargs.update(distribution="erk")
    elif key == "synflow":
        kwargs.update(rounds=100)
    elif key == "lottery":
        kwargs.update(rewind_step=min(steps // 20, 100))
    kwargs.update(overrides)
    return kwargs
