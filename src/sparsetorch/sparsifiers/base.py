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

Under FSDP2 the target parameters are DTensors and so are their masks (``core.masks``). A method computes a
layer's new mask from a global view (the layer's scores gathered with ``full``), the same on every rank, and
hands ``set_masks`` an iterator: each layer's full mask lives only while that layer is installed, and each
rank keeps its shard.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from ..core.masks import get_mask, remove_masks, set_mask, shard_masks, zero_optimizer_state
from ..core.layer_selection import Spec, Target, select_targets
from ..core.distributed import broadcast_from_rank0, full, global_sum, is_distributed, is_sharded, local

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
        self._sharded: list[bool] = []  # per target: was its parameter an FSDP2 DTensor at attach

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
        if any(is_sharded(t.param) for t in targets):  # masks set before fully_shard become shards first
            shard_masks(model)
        self.model, self.optimizer, self.targets = model, optimizer, targets
        try:
            masks = self.initial_masks()
        except Exception:
            self.model, self.optimizer, self.targets = None, None, []
            raise
        self.set_masks(masks, record=True)
        self._sharded = [is_sharded(t.param) for t in targets]
        return self

    def step(self) -> None:
        """Advance one training step; call after every ``optimizer.step()``."""
        self._check_attached("step")
        if any(is_sharded(t.param) and not was for t, was in zip(self.targets, self._sharded)):
            raise SparsityError(
                f"{type(self).__name__} was attached before fully_shard replaced the model's parameters with "
                "DTensors; build the optimizer and attach the sparsifier after fully_shard (masks set before "
                "wrapping by sparsetorch.prune or prune_oneshot need nothing: they are sharded at the first "
                "optimizer step)")
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
        """A copy of target ``i``'s mask (a DTensor shard under FSDP2; ``full_mask`` gives the whole)."""
        mask = get_mask(self.targets[i].module, self.targets[i].name)
        return mask.clone() if mask is not None else torch.ones_like(self.targets[i].param, dtype=torch.bool)

    def full_mask(self, i: int) -> torch.Tensor:
        """Target ``i``'s whole mask on every rank (gathered under FSDP2)."""
        return full(self.current_mask(i))

    def set_masks(self, masks: Iterable[torch.Tensor], record: bool = True, *, moves: str | None = None,
                  zero_grown: bool = False, **info: Any) -> None:
        """Install new masks for every target, counting how many connections moved.

        ``masks``: one per target, in order: full masks, or DTensors placed like their (FSDP2) parameters. An
        iterator is consumed one layer at a time. ``moves="grown"`` / ``"max"`` adds the ``dropped`` and
        ``grown`` counts to the history row, with ``moved`` = grown (drop-and-grow at fixed density) or
        max(dropped, grown) (pruning). ``zero_grown``: grown weights and their optimizer state start at zero.
        """
        if isinstance(masks, Sequence) and len(masks) != len(self.targets):
            raise SparsityError(f"expected {len(self.targets)} masks, got {len(masks)}")
        dropped = grown = kept = total = count = 0
        for target, mask in zip(self.targets, masks):
            count += 1
            mask = _agree_across_ranks(mask.to(torch.bool))
            old = get_mask(target.module, target.name)
            old = None if old is None else old.clone()
            new = set_mask(target.module, mask, target.name)
            if old is not None:
                dropped += global_sum(old & ~new)
                grown += global_sum(new & ~old)  # newly grown == newly dropped at fixed density
            kept += global_sum(new)
            total += new.numel()
            if zero_grown and old is not None:  # pruned and grown entries: weights and optimizer state at zero
                _zero_where(self.optimizer, target.param, new & old)
            elif self.optimizer is not None:
                zero_optimizer_state(self.optimizer, target.param, new)
        if count != len(self.targets):
            raise SparsityError(f"expected {len(self.targets)} masks, got {count}")
        if record:
            row = {"step": self.step_count, "density": kept / max(total, 1), "moved": grown}
            if moves is not None:
                row.update(dropped=dropped, grown=grown, moved=max(dropped, grown) if moves == "max" else grown)
            self.history.append({**row, **info})

    def density(self) -> float:
        kept = total = 0
        for i in range(len(self.targets)):
            mask = get_mask(self.targets[i].module, self.targets[i].name)
            kept += self.targets[i].param.numel() if mask is None else global_sum(mask)
            total += self.targets[i].param.numel()
        return kept / max(total, 1)

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
            "masks": {t.qualified_name: _on_cpu(self.current_mask(i)) for i, t in enumerate(self.targets)},
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


def _agree_across_ranks(mask: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every rank takes rank 0's full mask so replicas never diverge. A DTensor mask
    is already one global mask: each rank's shard is its part."""
    if not is_distributed() or is_sharded(mask):
        return mask
    return broadcast_from_rank0(mask)


def _on_cpu(mask: torch.Tensor) -> torch.Tensor:
    return mask if is_sharded(mask) else mask.cpu()  # a DTensor stays sharded for torch.distributed.checkpoint


@torch.no_grad()
def _zero_where(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero ``param`` and its optimizer state where ``keep`` is False (grown connections start at zero)."""
    local(param).mul_(local(keep))
    if optimizer is not None:
        zero_optimizer_state(optimizer, param, keep)
