"""Load everything or change nothing (issue #20): snapshots of a model, an optimizer and a sparsifier,
put back when a load fails part way (``torch.nn.Module.load_state_dict`` copies module by module, so a
tensor rejected in the fifth layer leaves the first four loaded).

    with rollback(model, optimizer, sparsifier):
        ...  # any exception: everything is restored, then re-raised (as SparsityError unless it was one)
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SparsityError
from .masks import iter_masks, remove_mask, set_mask


class ModelSnapshot:
    """Every module's parameter and buffer slots (the tensor objects and a copy of their data) and masks."""

    def __init__(self, model: nn.Module):
        self.slots = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        self.data = {id(t): (t, t.detach().clone()) for _, params, buffers in self.slots
                     for t in (*params.values(), *buffers.values()) if t is not None}
        self.masks = [(item.module, item.name, item.mask.clone()) for item in iter_masks(model)]
        self.model = model

    @torch.no_grad()
    def restore(self) -> None:
        kept = {(id(m), n) for m, n, _ in self.masks}
        for item in list(iter_masks(self.model)):  # masks (and their gradient hooks) the load added
            if (id(item.module), item.name) not in kept:
                remove_mask(item.module, item.name)
        for module, params, buffers in self.slots:  # the same tensor objects: optimizers keep tracking them
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        for module, name, mask in self.masks:
            set_mask(module, mask, name)
        for tensor, saved in self.data.values():
            if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
                tensor.data = saved
            else:
                tensor.copy_(saved)


class SparsifierSnapshot:
    """A sparsifier's own attributes, and its state_dict when attached; one attached during the load
    (``sparsifier.model is None`` now) is removed again on restore."""

    def __init__(self, sparsifier: Any):
        self.sparsifier = sparsifier
        self.attached = getattr(sparsifier, "model", None) is not None
        self.attrs = {k: copy.copy(v) for k, v in vars(sparsifier).items()}
        self.state = copy.deepcopy(sparsifier.state_dict()) if self.attached else None
        self.generators = {k: v.get_state() for k, v in self.attrs.items() if isinstance(v, torch.Generator)}

    def restore(self) -> None:
        s = self.sparsifier
        if not self.attached and getattr(s, "model", None) is not None:
            s.remove()  # drops its hooks; the model snapshot then puts the weights back
        vars(s).clear()
        vars(s).update(self.attrs)
        for k, state in self.generators.items():  # copy.copy shares a Generator: put its state back
            self.attrs[k].set_state(state)
        if self.state is not None:
            s.load_state_dict(copy.deepcopy(self.state))


@contextmanager
def rollback(model: nn.Module | None, optimizer: Any = None, sparsifier: Any = None,
             what: str = "the load") -> Iterator[None]:
    """Run the block; on any exception restore model, optimizer and sparsifier as they were, then re-raise
    (a non-SparsityError Exception becomes a SparsityError naming what failed)."""
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    spars = SparsifierSnapshot(sparsifier) if sparsifier is not None else None
    snap = ModelSnapshot(model) if model is not None else None
    try:
        yield
    except BaseException as exc:
        if spars is not None:
            spars.restore()
        if snap is not None:
            snap.restore()
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        if isinstance(exc, Exception) and not isinstance(exc, SparsityError):
            raise SparsityError(f"{what} failed ({type(exc).__name__}: {exc}); nothing was changed. The file is "
                                "corrupted or does not belong to this model/optimizer") from exc
        raise
