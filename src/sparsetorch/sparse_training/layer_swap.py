"""Swap a model's Linear layers for SparseLinear (``to_sparse_training``) and back (``to_dense``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..core.distributions import layer_densities
from ..core.rng import resolve_generator
from ..errors import SparsityError, check_sparsity
from ..core.layer_selection import select_targets
from ..core.distributed import is_distributed
from .sparse_linear import TRANSPOSED_MAP_BUFFERS, SparseLinear


def to_sparse_training(model: nn.Module, sparsity: float = 0.9, distribution: str = "erk", *,
                       include=None, exclude=None, init: str = "random", rescale: bool = False,
                       generator: torch.Generator | None = None, backend: str = "auto") -> nn.Module:
    """Replace the eligible nn.Linear layers of ``model`` (in place; returned) by SparseLinear.

    Eligible: what ``select_targets(model, include, exclude)`` picks (by default every Linear except a final
    classifier / lm_head, including the projections inside attention and MLP blocks built from nn.Linear) that
    is an nn.Linear with float32/float64 weights. ``distribution`` ("erk", "er", "uniform") splits the overall
    ``sparsity`` across these layers; ``init`` "random" (sparse training from scratch) or "magnitude" chooses
    which weights each layer keeps; ``rescale=True`` then scales each row's kept weights by sqrt(in / kept
    fan-in) (sparsity-aware init, :meth:`SparseLinear.rescale_by_fan_in_`; for training from scratch, with
    :func:`param_groups` for the optimizer). Create the optimizer (and LR scheduler) after the swap: the layers'
    parameters are new tensors of nnz values.
    """
    sparsity = check_sparsity(sparsity)
    targets = [t for t in select_targets(model, include, exclude) if type(t.module) is nn.Linear]
    if not targets:
        raise SparsityError("no nn.Linear layer to make sparse; pass include=[...] with layer names or types")
    if any(t.fqn == "" for t in targets):
        raise SparsityError("the model itself is an nn.Linear: use SparseLinear.from_dense(linear, sparsity)")
    bad = [t.fqn for t in targets if t.module.weight.dtype not in (torch.float32, torch.float64)]
    if bad:
        raise SparsityError(f"SparseLinear supports float32/float64 weights; layers {bad[:3]} are "
                            f"{targets[0].module.weight.dtype}: call model.float() first", layers=bad)
    shapes = [tuple(t.module.weight.shape) for t in targets]
    densities = layer_densities(distribution, shapes, sparsity)
    generator = resolve_generator(generator)  # one stream for all layers: same-shaped layers must differ
    new = [SparseLinear.from_dense(t.module, min(1.0, max(0.0, 1.0 - d)), init=init, generator=generator,
                                   backend=backend) for t, d in zip(targets, densities)]
    if rescale:
        for layer in new:
            layer.rescale_by_fan_in_()
    for t, layer in zip(targets, new):  # swap only after every layer was built: nothing half-changed on error
        model.set_submodule(t.fqn, layer)
    hide_indices_from_ddp(model)
    if is_distributed():
        broadcast_connectivity(model)
    return model


INDEX_BUFFERS = ("indptr", "indices", *TRANSPOSED_MAP_BUFFERS)


def hide_indices_from_ddp(model: nn.Module) -> None:
    """Tell DistributedDataParallel (wrapping ``model``) to leave the SparseLinear index buffers alone: it would
    broadcast them before every forward, and neither gloo nor NCCL takes their int16. Ranks keep the same
    connectivity instead through broadcast_connectivity and identical RigL/SET decisions."""
    names = [f"{fqn}.{b}" for fqn, m in model.named_modules() if isinstance(m, SparseLinear) for b in INDEX_BUFFERS]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))  # read by DDP's constructor


@torch.no_grad()
def broadcast_connectivity(model: nn.Module) -> None:
    """Under torch.distributed, give every SparseLinear of ``model`` rank 0's connectivity (values follow from
    DDP's own broadcast of the parameters when it wraps the model)."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            flat = m.flat_positions()
            dist.broadcast(flat, src=0)
            m.set_connectivity(flat)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear of ``model`` (in place; returned) by an nn.Linear holding zeros at the
    pruned positions. Create a new optimizer afterwards."""
    if isinstance(model, SparseLinear):
        return model.to_linear()
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)]
    for fqn, m in layers:
        model.set_submodule(fqn, m.to_linear())
    return model
