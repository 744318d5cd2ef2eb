"""N:M packed: kept values plus one small code per group of M consecutive inputs naming which are kept.

A group keeping at most N of M weights has ``sum_k<=N C(M, k)`` possible masks (exactly N:
``C(M, N)``); we store its rank among them in ``ceil(log2(count))`` bits. For 2:4 that is 3 bits
per group when every group keeps exactly 2 (1.5 bits per kept value; 2-bit indices would need 4),
for 4:8 seven bits. Groups run along the input dim of the ``[out, in * k...]`` view, like the
N:M pattern and sparse tensor cores.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..errors import SparsityError
from .layout_helpers import flat_mask, int_meta, matrix_shape, pack_codes, unpack_codes
from .format_registry import Format, need, parse_dtype, parse_shape, register_format

_GROUPS = (4, 8, 16)


@lru_cache(maxsize=None)
def _popcount(m: int) -> np.ndarray:
    return np.array([bin(p).count("1") for p in range(1 << m)])


@lru_cache(maxsize=None)
def _tables(m: int, n: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rank of every m-bit group mask, or -1 if not allowed; allowed masks in rank order)."""
    pops = _popcount(m)
    allowed = (pops == n) if exact else (pops <= n)
    rank = np.where(allowed, np.cumsum(allowed) - 1, -1)
    return rank, np.flatnonzero(allowed)


def _bits(count: int) -> int:
    return max(1, math.ceil(math.log2(count)))


def _patterns(keep: np.ndarray, g: int) -> np.ndarray:
    """Each group of ``g`` consecutive flags as a ``g``-bit integer (bit i = the i-th weight), via packbits."""
    packed = np.packbits(keep, bitorder="little")  # [ceil(numel / 8)]
    if g == 4:
        return np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)[: keep.size // 4].astype(np.int64)
    if g == 8:
        return packed.astype(np.int64)
    return packed.reshape(-1, 2).astype(np.int64) @ np.array([1, 256], dtype=np.int64)


def _expand(patterns: np.ndarray, g: int) -> np.ndarray:
    """Inverse of ``_patterns``: flat bool flags."""
    bits = np.unpackbits(patterns.astype("<u2").view(np.uint8), bitorder="little").reshape(-1, 16)
    return bits[:, :g].reshape(-1).astype(bool)


def encode(tensor: torch.Tensor, mask: torch.Tensor | None, m: int | None = None):
    rows, cols = matrix_shape(tuple(tensor.shape))
    keep = flat_mask(tensor, mask)
    fits = [g for g in ((m,) if m else _GROUPS) if cols % g == 0]
    if not fits:
        raise SparsityError(f"N:M storage needs the {cols} inputs per output to be divisible by the group size")
    best = None
    flags = keep.numpy()
    for g in fits:
        patterns = _patterns(flags, g)  # [rows * cols / g]
        counts = _popcount(g)[patterns]
        n, exact = int(counts.max()) if counts.size else 0, bool(counts.size and counts.min() == counts.max())
        bits = _bits(len(_tables(g, n, exact)[1]))
        if best is None or patterns.size * bits < best[0]:
            best = (patterns.size * bits, g, n, exact, patterns)
    _, g, n, exact, patterns = best
    codes = _tables(g, n, exact)[0][patterns]
    values = tensor.detach().reshape(-1)[keep].contiguous()
    parts = {"values": values, "codes": pack_codes(codes, _bits(len(_tables(g, n, exact)[1])))}
    return parts, {"nnz": int(values.numel()), "n": n, "m": g, "exact": exact}


def decode(parts, meta):
    shape, dtype = parse_shape(meta.get("shape")), parse_dtype(meta.get("dtype"))
    numel = math.prod(shape)
    rows, cols = matrix_shape(shape)
    m = meta.get("m")
    if (not isinstance(m, int) or isinstance(m, bool) or m not in _GROUPS or cols % m
            or not isinstance(meta.get("exact"), bool)):
        raise SparsityError(f"N:M tensor has an invalid group size {m!r}; the file is corrupted")
    n = int_meta(meta, "n", 0, m)
    nnz = int_meta(meta, "nnz", 0, numel)
    values = need(parts, "values", nnz, dtype)
    groups = numel // m
    allowed = _tables(m, n, meta["exact"])[1]
    bits = _bits(len(allowed))
    codes = unpack_codes(need(parts, "codes", math.ceil(groups * bits / 8), torch.uint8), groups, bits)
    if codes.size and int(codes.max()) >= len(allowed):
        raise SparsityError("an N:M group code is out of range; the file is corrupted")
    keep = _expand(allowed[codes], m)  # [numel]
    if int(keep.sum()) != nnz:
        raise SparsityError(f"N:M codes keep {int(keep.sum())} weights but the file says {nnz}; it is corrupted")
    mask = torch.from_numpy(keep)
    dense = torch.zeros(numel, dtype=dtype)
    dense[mask] = values
    return dense.reshape(shape), mask.reshape(shape)


register_format(Format("nm", encode, decode))
