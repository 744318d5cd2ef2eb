"""Helpers the sparse formats share: the 2-D view, kept values, and a validated scatter back to dense.

Every sparse format stores the kept values in row-major order of the tensor (CSR, bitmask,
gap-coded mask, N:M) or of its blocks (BSR), plus the positions in some compact code. Decoders
turn the code back into flat positions and must prove them sane before writing anything.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SparsityError


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[rows, cols]`` of the view patterns use: ``[out, in * k...]``, a vector is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def flat_mask(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The kept positions as a flat bool tensor: ``mask`` if given, else the nonzeros."""
    m = (tensor != 0) if mask is None else mask
    return m.detach().reshape(-1).to(device=tensor.device, dtype=torch.bool)


def narrowest_int(max_value: int, min_value: int = 0) -> torch.dtype:
    """The smallest integer dtype safetensors stores that holds [min_value, max_value]."""
    if min_value >= 0 and max_value <= 255:
        return torch.uint8
    for dtype in (torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= min_value and max_value <= info.max:
            return dtype
    return torch.int64


def check_positions(pos: torch.Tensor, numel: int, what: str) -> None:
    """Decoded flat positions must be strictly increasing and inside the tensor (no duplicate, no OOB write)."""
    if pos.numel() == 0:
        return
    if int(pos[0]) < 0 or int(pos[-1]) >= numel or (pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all())):
        raise SparsityError(f"{what} points outside the tensor or repeats a position; the file is corrupted")


def scatter(shape: tuple[int, ...], pos: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tensor and bool mask of ``shape`` with ``values`` at the (checked) flat ``pos``."""
    numel = math.prod(shape)
    dense = torch.zeros(numel, dtype=values.dtype)
    mask = torch.zeros(numel, dtype=torch.bool)
    dense[pos] = values
    mask[pos] = True
    return dense.reshape(shape), mask.reshape(shape)


def pack_codes(codes: np.ndarray, bits: int) -> torch.Tensor:
    """Unsigned codes < 2**bits -> a little-endian bit stream (uint8), ``bits`` bits each."""
    dt = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.uint64
    planes = ((codes.astype(dt)[:, None] >> np.arange(bits, dtype=dt)) & 1).astype(np.uint8)  # [count, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` codes of ``bits`` bits as int64."""
    planes = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    return planes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def int_meta(meta: dict, key: str, low: int = 0, high: int = 2**62) -> int:
    """An integer field of a format's metadata, range-checked."""
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SparsityError(f"file has an invalid {key!r} ({value!r}) for a sparse tensor; it is corrupted")
    return value
