"""torch.distributed helpers shared by the sparsifiers, the compressed layers and one-shot calibration
(no sparsetorch imports).

Every collective here works on any backend: gloo reduces CPU tensors, NCCL only CUDA tensors, so each
tensor travels on ``collective_device`` and is copied back in place (a no-op when it already lives there).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` sharded on dim 0; its
mask is a bool ``DTensor`` with the same mesh and placements, so every elementwise op between the two
runs on the local shards without communication. ``torch.distributed.tensor`` is looked up lazily: if no
one imported it, no DTensor can exist, and ``import sparsetorch`` stays light.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "launched_process_group", "collective_device", "all_reduce_sum",
           "any_rank", "fingerprint", "disagreeing", "agree_with_rank0", "is_sharded", "full", "local", "shard_like",
           "global_sum", "broadcast_from_rank0", "all_reduce_small"]


def is_distributed() -> bool:
    """True inside a torch.distributed run of more than one process (DDP, FSDP): ranks must agree."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def launched_process_group() -> Iterator[bool]:
    """For a command launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): the default process group,
    initialised from the environment torchrun sets (NCCL with each rank on GPU ``LOCAL_RANK`` when CUDA is
    available, gloo otherwise) for the duration of the block, then destroyed. Yields whether this process is
    one of several ranks. A group that is already initialised is used as it is (and left to its owner);
    outside torchrun nothing happens."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield is_distributed()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK") or 0))  # before NCCL picks a GPU per rank
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield is_distributed()
    finally:
        dist.destroy_process_group()


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` must be for the default process group's collectives: NCCL needs this rank's
    GPU, gloo (and the others) the CPU; a CUDA tensor under a mixed "cpu:gloo,cuda:nccl" group stays put."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and (tensor.device.type == "cuda" or "gloo" not in backend):
        return tensor.device if tensor.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if a collective can use it as it is, else a contiguous copy on the collective's
    device (bool as uint8, which every backend carries) to be copied back afterwards."""
    device = collective_device(tensor)
    if tensor.dtype == torch.bool:
        return tensor.to(device=device, dtype=torch.uint8).contiguous()
    return tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace each tensor by its sum over the ranks, in place (nothing happens on one process).

    Every rank must pass the same keys in the same order with the same shapes and dtypes. The reduced
    values are bitwise identical on every rank (gloo and NCCL both hand each rank the same result); they
    differ from a single process's sum only by the order of the float additions."""
    if not is_distributed():
        return
    pending = []
    for tensor in tensors.values():
        buf = _on_device(tensor)
        pending.append((tensor, buf, dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)))
    for tensor, buf, work in pending:
        work.wait()
        if buf is not tensor:
            tensor.copy_(buf)


def any_rank(flag: bool, *, device: torch.device | None = None) -> bool:
    """Whether ``flag`` is True on at least one rank (``flag`` itself on one process): one tiny all-reduce,
    so that a decision taken from local data (an invalid calibration shard) is taken by every rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device or "cpu")
    t = _on_device(t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_CHUNK = 1 << 22  # words per step: bounds the int64 temporaries of fingerprint to 32 MiB


def fingerprint(tensor: torch.Tensor) -> int:
    """An exact hash of ``tensor``'s bytes: sum_i word_i * (i + 1) over its 32-bit words (bytes if its size is
    not a multiple of 4), in int64 arithmetic modulo 2^64, kept to 62 bits (so that it can be negated).
    Integer sums do not depend on the order of the additions, so equal tensors give equal fingerprints
    on any device; one changed bit changes it."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.storage_offset() * flat.element_size() % 4:  # a view at an odd byte offset: words need alignment
        flat = flat.clone()
    raw = flat.view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw  # the layout depends on the size alone
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    positions = torch.arange(1, min(_CHUNK, words.numel()) + 1, dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        part = words[start:start + _CHUNK].to(torch.int64)
        # sum_i part_i * (start + i + 1), without building the shifted positions
        total += (part * positions[:part.numel()]).sum() + start * part.sum()
    return int(total.item()) & ((1 << 62) - 1)


def disagreeing(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Indices of ``tensors`` that are not bitwise identical on every rank (the same list on every rank; empty
    on one process), by comparing fingerprints in one small all-reduce. Every rank passes the same number
    of tensors, in the same order."""
    if not is_distributed() or not tensors:
        return []
    prints = torch.tensor([fingerprint(t) for t in tensors], dtype=torch.int64)  # [n]
    both = _on_device(torch.cat([prints, -prints]))  # one MAX gives the max and (minus) the min of each
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    both = both.cpu()
    n = len(tensors)
    return [i for i in range(n) if int(both[i]) != -int(both[n + i])]


def agree_with_rank0(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Make ``tensors`` identical on every rank: those that differ somewhere (``disagreeing``) take rank 0's
    values in place (broadcast); the others cost nothing but their fingerprint. Returns the indices taken
    from rank 0 (the same list on every rank). Same shapes on every rank, in the same order."""
    differ = disagreeing(tensors)
    for i in differ:
        buf = _on_device(tensors[i])
        dist.broadcast(buf, src=0)
        if buf is not tensors[i]:
            tensors[i].copy_(buf)
    return differ


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
    buf = _on_device(tensor)
    buf = buf.clone() if buf is tensor else buf
    dist.broadcast(buf, src=0)
    return buf.to(device=tensor.device, dtype=tensor.dtype)


def all_reduce_small(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor (counts, flags) across ranks and return it on the CPU (through the GPU for
    NCCL, which reduces only CUDA tensors); itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    buf = _on_device(tensor)
    dist.all_reduce(buf, op=op)
    return buf.cpu()
