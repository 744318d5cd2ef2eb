"""torch.distributed helpers shared by the sparsifiers and the compressed layers (no sparsetorch imports).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` sharded on dim 0; its
mask is a bool ``DTensor`` with the same mesh and placements, so every elementwise op between the two
runs on the local shards without communication. ``torch.distributed.tensor`` is looked up lazily: if no
one imported it, no DTensor can exist, and ``import sparsetorch`` stays light.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "is_sharded", "full", "local", "shard_like", "global_sum", "broadcast_from_rank0",
           "all_reduce_small"]


def is_distributed() -> bool:
    """True inside a torch.distributed run of more than one process (DDP, FSDP): ranks must agree."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(tensor: object) -> bool:
    """True for a ``DTensor`` (an FSDP2 parameter, its gradient, optimizer state or mask)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that writes through); the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every rank) as a DTensor placed like ``like``, without communication: each rank
    keeps its own chunk."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(local(like).device), like.device_mesh, like.placements, src_data_rank=None)


def global_sum(tensor: torch.Tensor) -> int:
    """Sum of all entries of ``tensor`` over every shard (a Partial-sum reduction for a DTensor)."""
    if not is_sharded(tensor):
        return int(tensor.sum())
    return int(tensor.sum().full_tensor())


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as rank 0 has it (bool sent as uint8; on the GPU for NCCL)."""
    buf = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.clone()
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    dist.broadcast(buf, src=0)
    return buf.to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_small(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor (counts, flags) across ranks and return it on the CPU (through the GPU for
    NCCL, which reduces only CUDA tensors); itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    buf = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(buf, op=op)
    return buf.cpu()
