"""Blocked sparse (BSR): one bit per block of the ``[out, in * k...]`` view, and the kept blocks' values.

Only for masks that are constant on blocks (block pruning, whole output channels, whole inputs).
The encoder finds the largest such block by itself: a mask is constant on ``bh x bw`` blocks
exactly when it is constant on groups of ``bh`` rows (for every column) and on groups of ``bw``
columns (for every row), so rows and columns are searched separately. Size: numel/(8*bh*bw)
bytes of block bits plus the kept values; the mask is nearly free.
"""
from __future__ import annotations

import math

import torch

from ..errors import SparsityError
from .layout_helpers import flat_mask, int_meta, matrix_shape
from .bits import pack_bits, unpack_bits
from .format_registry import Format, need, parse_dtype, parse_shape, register_format

_SIZES = (2, 4, 8, 16, 32, 64, 128)


def _largest_run(m: torch.Tensor, length: int, dim: int) -> int:
    """Largest size (power of two up to 128, or the whole dim) of groups along ``dim`` on which ``m`` is constant."""
    best = 1
    for size in (*[s for s in _SIZES if s < length], length):
        if length % size or size <= best:
            continue
        g = m.reshape(m.shape[0], length // size, size) if dim == 1 else m.reshape(length // size, size, -1)
        first = g[:, :, :1] if dim == 1 else g[:, :1, :]
        if not bool((g == first).all()):
            break  # constant on groups of `size` implies constant on every divisor; no larger size can work
        best = size
    return best


def block_shape(mask: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """The largest ``(bh, bw)`` on whose blocks the ``[rows, cols]`` mask is constant."""
    m = mask.reshape(rows, cols)
    return _largest_run(m, rows, 0), _largest_run(m, cols, 1)


def encode(tensor: torch.Tensor, mask: torch.Tensor | None):
    rows, cols = matrix_shape(tuple(tensor.shape))
    if tensor.numel() == 0:
        raise SparsityError("an empty tensor has no blocks; BSR storage does not apply")
    keep = flat_mask(tensor, mask).reshape(rows, cols)
    bh, bw = block_shape(keep, rows, cols)
    if bh * bw == 1:
        raise SparsityError("the mask is not constant on blocks; BSR storage does not apply")
    blocks = keep[::bh, ::bw]  # [rows / bh, cols / bw], one flag per block
    tiles = tensor.detach().reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2)  # [R, C, bh, bw]
    values = tiles[blocks].reshape(-1).contiguous()
    return {"values": values, "blocks": pack_bits(blocks)}, {"block": [bh, bw], "nblocks": int(blocks.sum())}


def decode(parts, meta):
    shape, dtype = parse_shape(meta.get("shape")), parse_dtype(meta.get("dtype"))
    rows, cols = matrix_shape(shape)
    block = meta.get("block")
    if (not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)
            or rows % block[0] or cols % block[1]):
        raise SparsityError(f"BSR tensor has an invalid block shape {block!r}; the file is corrupted")
    bh, bw = block
    grid = (rows // bh, cols // bw)
    blocks = unpack_bits(need(parts, "blocks", (math.prod(grid) + 7) // 8, torch.uint8), grid)
    kept = int(blocks.sum())
    if int_meta(meta, "nblocks", 0, math.prod(grid)) != kept:
        raise SparsityError(f"BSR block bits keep {kept} blocks but the file says {meta.get('nblocks')}; "
                            "it is corrupted")
    values = need(parts, "values", kept * bh * bw, dtype)
    tiles = torch.zeros(*grid, bh, bw, dtype=dtype)
    tiles[blocks] = values.reshape(kept, bh, bw)
    dense = tiles.transpose(1, 2).reshape(shape)
    mask = blocks[:, None, :, None].expand(grid[0], bh, grid[1], bw).reshape(shape)
    return dense, mask


register_format(Format("bsr", encode, decode))
