"""The ``Sparsifier`` base: training-time sparsity stepped like an optimizer or LR scheduler.

Usage (one extra line per training step)::

    sparsifier = SomeSparsifier(sparsity=0.9).attach(model, optimizer)
    for x, y in data:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        sparsifier.step()          # after every optimizer.step()

A subclass decides the masks: ``initial_masks()`` once at ``attach`` and ``update(step)`` after
each step. It changes masks only through ``self.set_masks`` so that the history of how many
connections moved, the optimizer-state zeroing and DDP agreement are handled here once.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SparsityError
from ..core.masks import get_mask, remove_masks, set_mask, zero_optimizer_state
from ..core.layer_selection import Spec, Target, select_targets
from ..core.distributed import is_distributed

__all__ = ["Sparsifier"]


class Sparsifier:
    """Base class. Subclasses take keyword hyperparameters and override ``initial_masks``/``update``.

    Args:
        include / exclude: which layers, as in ``sparsetorch.prune``.
        generator: every random choice draws from it; same seed, same masks.
    """

    def __init__(self, *, include: Spec = None, exclude: Spec = None, generator: torch.Generator | None = None,
                 **unknown: Any):
        if unknown:
            raise unknown_keyword_error(type(self), unknown)
        self.include, self.exclude = include, exclude
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.targets: list[Target] = []
        self.step_count = 0
        self.history: list[dict[str, Any]] = []  # one row per mask update: step, density, moved

    # ---- to override ------------------------------------------------------------------
    def initial_masks(self) -> list[torch.Tensor]:
        """Masks at attach time; default keeps existing masks or everything."""
        return [self.current_mask(i) for i in range(len(self.targets))]

    def update(self, step: int) -> None:
        """Called after optimizer step number ``step`` (1-based). Default: nothing."""

    def extra_state(self) -> dict[str, Any]:
        """Subclass state beyond masks/step/history/generator (must be tensors or plain data)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- the optimizer-like interface ------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "Sparsifier":
        """Choose the target layers of ``model``, install the initial masks, and return self."""
        self._check_detached()
        targets = select_targets(model, self.include, self.exclude)
        check_in_optimizer(optimizer, targets)
        self.model, self.optimizer, self.targets = model, optimizer, targets
        try:
            masks = self.initial_masks()
        except Exception:
            self.model, self.optimizer, self.targets = None, None, []
            raise
        self.set_masks(masks, record=True)
        return self

    def step(self) -> None:
        """Advance one training step; call after every ``optimizer.step()``."""
        self._check_attached("step")
        self.step_count += 1
        self.update(self.step_count)

    def remove(self) -> nn.Module:
        """Make the sparsity permanent (zeros stay in the weights), drop masks and hooks, detach."""
        model = self._check_attached("remove")
        remove_masks(model)
        self.model, self.optimizer, self.targets = None, None, []
        return model

    # ---- helpers for subclasses -------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        return [t.param for t in self.targets]

    def current_mask(self, i: int) -> torch.Tensor:
        mask = get_mask(self.targets[i].module, self.targets[i].name)
        return mask.clone() if mask is not None else torch.ones_like(self.targets[i].param, dtype=torch.bool)

    def set_masks(self, masks: Sequence[torch.Tensor], record: bool = True, **info: Any) -> None:
        """Install new masks for every target, counting how many connections moved."""
        if len(masks) != len(self.targets):
            raise SparsityError(f"expected {len(self.targets)} masks, got {len(masks)}")
        masks = _agree_across_ranks([m.to(torch.bool) for m in masks])
        moved = kept = total = 0
        for target, mask in zip(self.targets, masks):
            mask = mask.to(target.param.device)  # masks from state_dict() are on the CPU
            old = get_mask(target.module, target.name)
            if old is not None:
                moved += int((mask & ~old).sum())  # newly grown == newly dropped at fixed density
            kept += int(mask.sum())
            total += mask.numel()
            set_mask(target.module, mask, target.name)
            if self.optimizer is not None:
                zero_optimizer_state(self.optimizer, target.param, target.module._buffers[target.name + "_mask"])
        if record:
            self.history.append({"step": self.step_count, "density": kept / max(total, 1), "moved": moved, **info})

    def density(self) -> float:
        masks = [self.current_mask(i) for i in range(len(self.targets))]
        return sum(int(m.sum()) for m in masks) / max(sum(m.numel() for m in masks), 1)

    def _check_detached(self) -> None:
        if self.model is not None:
            raise SparsityError(f"{type(self).__name__} is already attached; create a new one per model")

    def _check_attached(self, what: str) -> nn.Module:
        if self.model is None:
            raise SparsityError(f"call attach(model, optimizer) before {what}()")
        return self.model

    # ---- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, step count, history, generator state and subclass state: all that resuming needs."""
        self._check_attached("state_dict")
        return {
            "step": self.step_count,
            "masks": {t.qualified_name: self.current_mask(i).cpu() for i, t in enumerate(self.targets)},
            "history": [dict(row) for row in self.history],
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the sparsifier must be attached to a matching model."""
        self._check_attached("load_state_dict")
        names = [t.qualified_name for t in self.targets]
        masks = state.get("masks", {})
        if sorted(masks) != sorted(names):
            raise SparsityError(
                "sparsifier state does not match the attached model's layers: "
                f"missing {sorted(set(names) - set(masks))[:5]}, unexpected {sorted(set(masks) - set(names))[:5]}"
            )
        for t in self.targets:
            if tuple(masks[t.qualified_name].shape) != tuple(t.param.shape):
                raise SparsityError(f"mask for {t.qualified_name} has shape {tuple(masks[t.qualified_name].shape)}, "
                                    f"the layer has {tuple(t.param.shape)}")
        self.set_masks([masks[n] for n in names], record=False)
        self.step_count = int(state["step"])
        self.history = [dict(row) for row in state.get("history", [])]
        self.generator.set_state(state["generator"])
        self.load_extra_state(state.get("extra", {}))

    def __repr__(self) -> str:
        where = f"attached to {len(self.targets)} layers" if self.model is not None else "not attached"
        return f"{type(self).__name__}(step={self.step_count}, {where})"


def valid_keywords(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts: the named parameters of every ``__init__`` in its MRO."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                names.append(p.name)
    return names


def unknown_keyword_error(cls: type, unknown: dict[str, Any]) -> SparsityError:
    """SparsityError naming the unknown keywords of ``cls(...)``, with close matches and the valid ones."""
    valid = valid_keywords(cls)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return SparsityError(f"{cls.__name__} got unknown keyword argument(s) {', '.join(hints)}; "
                         f"valid keywords are {sorted(valid)}", unknown=sorted(unknown))


def check_in_optimizer(optimizer: torch.optim.Optimizer | None, targets: Sequence[Target]) -> None:
    """Every target parameter must be in ``optimizer`` (when one is given), else its state could not follow."""
    if optimizer is None:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [t.qualified_name for t in targets if id(t.param) not in in_optimizer]
    if missing:
        raise SparsityError(
            f"parameters {missing[:5]} are not in the optimizer; create the optimizer from "
            "model.parameters() before attaching (or exclude those layers)",
            missing=missing,
        )


def _agree_across_ranks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under torch.distributed, every rank takes rank 0's masks so replicas never diverge."""
    if not is_distributed():
        return masks
    out = []
    for mask in masks:
        buf = mask.to(torch.uint8)
        if dist.get_backend() == "nccl":
            buf = buf.cuda()
        dist.broadcast(buf, src=0)
        out.append(buf.to(device=mask.device, dtype=torch.bool))
    return out
