"""Masks that live with the model and keep pruned weights exactly zero.

A mask is a non-persistent bool buffer ``<param>_mask`` on the module that owns the
parameter, so ``model.state_dict()`` stays the plain dense one (pruned weights are zeros in
place). Pruned weights stay zero through training by two cheap mechanisms:

* a gradient hook on the parameter multiplies its gradient by the mask, and
* a global optimizer post-step hook re-applies the mask to the weight and zeroes the
  optimizer state (momentum, Adam moments) of pruned entries the first time an optimizer
  steps after a mask changed.

Both read the *current* buffer, so sparsifiers change masks by writing the buffer through
``set_mask`` and nothing needs re-registering.

Under FSDP2 (``fully_shard``) the parameter is a DTensor sharded on dim 0 and its mask is a bool DTensor
with the same mesh and placements: each rank holds only its shard. FSDP2 assigns the reduce-scattered
gradient to the sharded parameter without autograd (a tensor hook on it never fires), then runs its
post-accumulate-grad hooks, so that is where a sharded gradient is masked. Masks attached before
``fully_shard`` (e.g. by ``sparsetorch.prune``) stay full plain tensors; the first optimizer step after
wrapping shards them (``shard_masks``), masking that step's gradients first.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import SparsityError
from .distributed import is_sharded, local, shard_like
from .layer_selection import Target

__all__ = ["set_mask", "get_mask", "has_mask", "iter_masks", "remove_masks", "remove_mask", "MaskedParam", "apply_masks",
           "set_input_order", "get_input_order", "shard_masks"]

_SUFFIX = "_mask"
_ORDER_SUFFIX = "_input_order"


@dataclass
class _Entry:
    module: weakref.ref
    name: str
    version: int
    hook: torch.utils.hooks.RemovableHandle | None  # None while the parameter is frozen (no gradient to mask)

    def mask(self) -> torch.Tensor | None:
        module = self.module()
        return None if module is None else module._buffers.get(self.name + _SUFFIX)


# parameter -> its mask entry; weak so that deleting a model frees everything
_REGISTRY: "WeakIdKeyDictionary[nn.Parameter, _Entry]" = WeakIdKeyDictionary()
# optimizer -> {parameter: mask version whose pruned state it has already zeroed}
_SEEN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
_GLOBAL_HOOK: torch.utils.hooks.RemovableHandle | None = None
_GLOBAL_PRE_HOOK: torch.utils.hooks.RemovableHandle | None = None
# modules holding a mask, to find masks attached before fully_shard replaced their parameters
_MASKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True)
class MaskedParam(Target):
    """One masked parameter: a ``Target`` (``fqn`` names the module) plus its current mask."""

    mask: torch.Tensor | None = None


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Attach (or replace) the keep-mask of ``module.<name>`` and zero the pruned weights in place.

    Returns the mask buffer. Optimizer state of newly pruned entries is zeroed at the next
    optimizer step (see module docstring).
    """
    param = getattr(module, name, None)
    if not isinstance(param, nn.Parameter):
        raise SparsityError(f"{type(module).__name__} has no parameter {name!r} to mask", parameter=name)
    if tuple(mask.shape) != tuple(param.shape):
        raise SparsityError(
            f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(param.shape)}",
            mask_shape=tuple(mask.shape), param_shape=tuple(param.shape),
        )
    mask = _placed_like(mask, param, name)
    buffer_name = name + _SUFFIX
    old = module._buffers.get(buffer_name)
    if old is not None and is_sharded(old) == is_sharded(mask):
        local(old).copy_(local(mask))
    else:
        module._buffers.pop(buffer_name, None)
        module.register_buffer(buffer_name, mask.clone(), persistent=False)
    with torch.no_grad():
        local(param).mul_(local(module._buffers[buffer_name]))
    entry = _REGISTRY.get(param)
    if entry is None:
        _register(module, name, param)
    else:
        entry.version += 1
    return module._buffers[buffer_name]


def _placed_like(mask: torch.Tensor, param: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` as a bool tensor placed like ``param``: on its device, or sharded like a DTensor parameter."""
    if not is_sharded(param):
        if is_sharded(mask):
            raise SparsityError(f"the mask of {name} is a DTensor but the parameter is not; pass mask.full_tensor()",
                                parameter=name)
        return mask.to(device=param.device, dtype=torch.bool)
    if not is_sharded(mask):
        return shard_like(mask.to(torch.bool), param)
    if mask.device_mesh != param.device_mesh or tuple(mask.placements) != tuple(param.placements):
        raise SparsityError(
            f"the mask of {name} is placed {tuple(mask.placements)} on {mask.device_mesh}, the parameter "
            f"{tuple(param.placements)} on {param.device_mesh}; pass the full mask (mask.full_tensor()) instead",
            parameter=name,
        )
    return mask.to(torch.bool)


def _register(module: nn.Module, name: str, param: nn.Parameter) -> None:
    _install_global_hook()
    hook = _grad_hook(module, name, param) if param.requires_grad else None
    _REGISTRY[param] = _Entry(weakref.ref(module), name, 1, hook)
    _MASKED.add(module)
    if not getattr(module, "_sparsetorch_mask_hook", False):
        module.register_forward_pre_hook(_register_copies)
        module._sparsetorch_mask_hook = True


def _register_copies(module: nn.Module, _args) -> None:
    """Forward pre-hook: a copy of a masked module (``copy.deepcopy``, ``load_state_dict(assign=True)``) has its
    mask buffer but new Parameters, which the tensor hooks and the registry do not know; register them before
    their first backward, so the copy keeps its pruned weights zero like the original."""
    if torch.compiler.is_compiling():
        return
    for buffer_name, mask in module._buffers.items():
        if mask is None or not buffer_name.endswith(_SUFFIX):
            continue
        param = module._parameters.get(buffer_name[: -len(_SUFFIX)])
        entry = None if param is None else _REGISTRY.get(param)
        if entry is not None and entry.hook is None and param.requires_grad:  # masked while frozen, now unfrozen
            entry.hook = _grad_hook(module, buffer_name[: -len(_SUFFIX)], param)
        if param is not None and not is_sharded(param) and (is_sharded(mask) or _has_sharded_entry(module)):
            continue  # FSDP2's unsharded view of a sharded parameter, live only during forward/backward
        if param is not None and entry is None:
            if tuple(param.shape) != tuple(mask.shape):
                raise SparsityError(
                    f"{type(module).__name__}.{buffer_name[: -len(_SUFFIX)]} was replaced by a tensor of shape "
                    f"{tuple(param.shape)}, but its mask has shape {tuple(mask.shape)}; call "
                    "sparsetorch.remove_masks(model) (or remove_mask(module)) before resizing a masked layer",
                    mask_shape=tuple(mask.shape), param_shape=tuple(param.shape),
                )
            with torch.no_grad():
                param.mul_(mask)
            _register(module, buffer_name[: -len(_SUFFIX)], param)


def _has_sharded_entry(module: nn.Module) -> bool:
    return getattr(module, "_sparsetorch_sharded", False)


def _grad_hook(module: nn.Module, name: str, param: nn.Parameter) -> torch.utils.hooks.RemovableHandle:
    """Mask ``param``'s gradient: a tensor hook, or for an FSDP2 parameter a post-accumulate-grad hook (FSDP2
    calls those after writing the reduce-scattered shard into ``param.grad``)."""
    if is_sharded(param):
        module._sparsetorch_sharded = True
        return param.register_post_accumulate_grad_hook(_sharded_grad_masker(module, name + _SUFFIX))
    return param.register_hook(_grad_masker(module, name + _SUFFIX))


def _grad_masker(module: nn.Module, buffer_name: str):
    ref = weakref.ref(module)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        owner = ref()
        mask = None if owner is None else owner._buffers.get(buffer_name)
        return grad if mask is None or is_sharded(mask) else grad * mask

    return hook


def _sharded_grad_masker(module: nn.Module, buffer_name: str):
    ref = weakref.ref(module)

    @torch.no_grad()
    def hook(param: torch.Tensor) -> None:
        owner = ref()
        mask = None if owner is None else owner._buffers.get(buffer_name)
        if mask is not None and param.grad is not None and is_sharded(mask):
            local(param.grad).mul_(local(mask))

    return hook


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The keep-mask of ``module.<name>``, or None if it is not masked."""
    return module._buffers.get(name + _SUFFIX)


def set_input_order(module: nn.Module, order: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Record the input-channel order ``module.<name>``'s mask was chosen in (e.g. RIA's N:M permutation).

    ``order`` is a permutation of the parameter's inputs (its 2-D view ``[out, rest]``): the mask is
    N:M on ``mask[:, order]``. The weights are not moved, so the module computes exactly what it
    did; this is bookkeeping for checks and for kernels that need the permuted layout. Stored as a
    non-persistent int64 buffer ``<name>_input_order`` (``state_dict()`` stays plain, like masks).
    Returns the buffer.
    """
    param = getattr(module, name, None)
    if not isinstance(param, nn.Parameter):
        raise SparsityError(f"{type(module).__name__} has no parameter {name!r} to order", parameter=name)
    inputs = param.shape[1:].numel() if param.dim() > 1 else param.shape[0]
    order = torch.as_tensor(order).to(device=param.device, dtype=torch.long).flatten()
    if order.numel() != inputs or not torch.equal(torch.sort(order).values, torch.arange(inputs, device=order.device)):
        raise SparsityError(
            f"input order must be a permutation of the {inputs} inputs of {name}, got {order.numel()} indices",
            parameter=name, inputs=inputs, length=order.numel(),
        )
    buffer_name = name + _ORDER_SUFFIX
    module._buffers.pop(buffer_name, None)
    module.register_buffer(buffer_name, order.clone(), persistent=False)
    return module._buffers[buffer_name]


def get_input_order(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The input order recorded by ``set_input_order`` for ``module.<name>``, or None."""
    return module._buffers.get(name + _ORDER_SUFFIX)


def has_mask(module: nn.Module, name: str = "weight") -> bool:
    return get_mask(module, name) is not None


def iter_masks(model: nn.Module) -> Iterator[MaskedParam]:
    """Every masked parameter of ``model`` in module order."""
    for fqn, module in model.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer is None or not buffer_name.endswith(_SUFFIX):
                continue
            name = buffer_name[: -len(_SUFFIX)]
            if isinstance(getattr(module, name, None), nn.Parameter) and buffer.dtype == torch.bool:
                yield MaskedParam(fqn, module, name, mask=buffer)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every pruned weight of ``model`` (e.g. after loading dense weights into it)."""
    for item in iter_masks(model):
        local(item.param).mul_(local(item.mask))


def remove_masks(model: nn.Module) -> None:
    """Make the sparsity permanent: zero pruned weights, drop masks and hooks.

    The weights stay as they are (zeros included); nothing keeps them zero afterwards.
    """
    apply_masks(model)
    for item in list(iter_masks(model)):
        remove_mask(item.module, item.name)
    for module in model.modules():  # an input order recorded without a mask goes too
        for buffer_name in [b for b in module._buffers if b.endswith(_ORDER_SUFFIX)]:
            if isinstance(getattr(module, buffer_name[: -len(_ORDER_SUFFIX)], None), nn.Parameter):
                module._buffers.pop(buffer_name, None)


def remove_mask(module: nn.Module, name: str = "weight") -> None:
    """Drop the mask of ``module.<name>``, its gradient hook and its input order (the weights are left as they are)."""
    param = getattr(module, name, None)
    entry = _REGISTRY.pop(param, None) if isinstance(param, nn.Parameter) else None
    if entry is not None and entry.hook is not None:
        entry.hook.remove()
    module._buffers.pop(name + _SUFFIX, None)
    module._buffers.pop(name + _ORDER_SUFFIX, None)


def _install_global_hook() -> None:
    global _GLOBAL_HOOK, _GLOBAL_PRE_HOOK
    if _GLOBAL_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _GLOBAL_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
        _GLOBAL_PRE_HOOK = register_optimizer_step_pre_hook(_before_optimizer_step)


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Shard masks attached before ``fully_shard`` (their parameters are DTensors now), masking this step's
    gradients, which no hook masked."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: nothing to shard
        return
    if any(_needs_sharding(m) for m in list(_MASKED)):
        shard_masks(*[m for m in list(_MASKED) if _needs_sharding(m)])


def _needs_sharding(module: nn.Module) -> bool:
    return any(mask is not None and name.endswith(_SUFFIX) and not is_sharded(mask)
               and is_sharded(module._parameters.get(name[: -len(_SUFFIX)]))
               for name, mask in module._buffers.items())


@torch.no_grad()
def shard_masks(*modules: nn.Module) -> None:
    """Shard every full mask whose parameter ``fully_shard`` made a DTensor (masks attached before wrapping,
    e.g. by ``sparsetorch.prune``): each rank keeps its chunk, the gradient hook moves to the sharded parameter,
    and the weights and any gradient are masked. Runs by itself at the first optimizer step after wrapping."""
    for root in modules:
        for module in list(root.modules()):
            for buffer_name, mask in list(module._buffers.items()):
                name = buffer_name[: -len(_SUFFIX)]
                param = module._parameters.get(name)
                if mask is None or not buffer_name.endswith(_SUFFIX) or is_sharded(mask) or not is_sharded(param):
                    continue
                if tuple(mask.shape) != tuple(param.shape):
                    raise SparsityError(f"{type(module).__name__}.{name} has shape {tuple(param.shape)} under "
                                        f"fully_shard, its mask {tuple(mask.shape)}", mask_shape=tuple(mask.shape))
                set_mask(module, mask, name)
                if param.grad is not None:
                    local(param.grad).mul_(local(module._buffers[buffer_name]))


@torch.no_grad()
def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _REGISTRY:
        return
    seen = _SEEN.setdefault(optimizer, WeakIdKeyDictionary())
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = _REGISTRY.get(param)
            if entry is None:
                continue
            mask = entry.mask()
            if mask is None:
                continue
            local(param).mul_(local(mask))
            if seen.get(param) != entry.version:
                zero_optimizer_state(optimizer, param, mask)
                seen[param] = entry.version


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero every per-element optimizer state tensor of ``param`` where ``mask`` is False."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value, keep = local(value), local(mask)
            value.mul_(keep.to(value.dtype) if value.is_floating_point() else keep)
