"""Validation of index buffers read from files, before they reach compiled kernels (issue #20).

Pure functions over numpy arrays (torch tensors: pass ``t.numpy()``); numpy and ``sparsetorch.errors``
only, so the torch-free edge runtime can use them. Each check is vectorised (one pass over the buffer)
and raises :class:`sparsetorch.errors.SparsityError` saying what is wrong and how to fix it.

A file that fails any of these is corrupted or hostile: the compiled kernels index raw memory with
these values and trust them completely.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..errors import SparsityError

# largest element count any one tensor may claim: keeps shape products far from int64 overflow
MAX_ELEMENTS = 1 << 48
INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_FIX = "the file is corrupted or was edited; re-export or re-save it from the original model"


def _fail(message: str, **context: object) -> None:
    raise SparsityError(f"{message}; {_FIX}", **context)


def check_dtype(name: str, array: np.ndarray, allowed: Iterable[type | np.dtype | str]) -> None:
    """``array.dtype`` must be one of ``allowed``."""
    allowed = tuple(np.dtype(a) for a in allowed)
    dtype = getattr(array, "dtype", None)
    if dtype not in allowed:
        _fail(f"{name} has dtype {dtype}, expected one of {[str(a) for a in allowed]}", name=name, dtype=str(dtype))


def check_shape(name: str, shape: object, ndim: int | None = None, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """A shape from a file header as a tuple of non-negative Python ints whose product is at most
    ``max_elements`` (no overflow: Python ints, bounded before any allocation)."""
    if not isinstance(shape, (list, tuple)) or (ndim is not None and len(shape) != ndim):
        _fail(f"{name} has shape {shape!r}, expected a list of {ndim if ndim is not None else 'some'} integers",
              name=name, shape=shape)
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            _fail(f"{name} has shape {list(shape)}: every dimension must be an integer >= 0", name=name, shape=shape)
        dims.append(int(d))
    total = 1
    for d in dims:
        total *= d
        if total > max_elements:
            _fail(f"{name} claims shape {dims} ({_product(dims)} elements), more than the limit {max_elements}",
                  name=name, shape=dims)
    return tuple(dims)


def _product(dims: Sequence[int]) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def check_size(name: str, array: np.ndarray, expected: int) -> None:
    """``array`` holds exactly ``expected`` elements."""
    if int(array.size) != int(expected):
        _fail(f"{name} holds {array.size} elements, expected {expected}", name=name, size=int(array.size),
              expected=int(expected))


def check_claimed_bytes(name: str, claimed: int, remaining: int) -> None:
    """A size read from a header (what a decoder would allocate) must be bounded by what the file holds:
    ``claimed`` bytes against the file's ``remaining`` bytes (callers pass e.g. 64x the file size for
    formats that expand, such as a bitmask's 8 weights per byte)."""
    if claimed < 0 or claimed > remaining:
        _fail(f"{name} claims {claimed} bytes but the file only justifies {remaining}", name=name,
              claimed=int(claimed), remaining=int(remaining))


def check_indices(name: str, indices: np.ndarray, upper: int) -> None:
    """Every index lies in ``[0, upper)``; ``indices`` has an integer dtype."""
    if indices.dtype.kind not in "iu":
        _fail(f"{name} has dtype {indices.dtype}; indices must be integers", name=name, dtype=str(indices.dtype))
    if indices.size == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= upper:
        bad = int(np.flatnonzero((indices < 0) | (indices >= upper))[0]) if upper >= 0 else 0
        _fail(f"{name} holds index {int(indices.reshape(-1)[bad])} at position {bad}, outside [0, {upper}) "
              f"(min {lo}, max {hi})", name=name, position=bad, upper=int(upper))


def check_csr(name: str, indptr: np.ndarray, indices: np.ndarray, rows: int, cols: int,
              nnz: int | None = None) -> None:
    """CSR row pointers and column indices of a ``rows x cols`` matrix: indptr integer [rows+1], starting at
    0, non-decreasing, ending at nnz == indices.size (== ``nnz`` when given); indices in [0, cols)."""
    if indptr.dtype.kind not in "iu":
        _fail(f"{name} row pointers have dtype {indptr.dtype}; they must be integers", name=name)
    if indptr.ndim != 1 or indptr.size != rows + 1:
        _fail(f"{name} has {indptr.size} row pointers for {rows} rows (expected {rows + 1})", name=name)
    if indices.ndim != 1:
        _fail(f"{name} column indices have shape {list(indices.shape)}, expected one flat list", name=name)
    count = int(indices.size) if nnz is None else int(nnz)
    if count != indices.size:
        _fail(f"{name} claims {count} nonzeros but stores {indices.size} column indices", name=name)
    if int(indptr[0]) != 0:
        _fail(f"{name} row pointers start at {int(indptr[0])}, expected 0", name=name)
    if rows and (np.diff(indptr.astype(np.int64)) < 0).any():
        row = int(np.flatnonzero(np.diff(indptr.astype(np.int64)) < 0)[0])
        _fail(f"{name} row pointers decrease at row {row} ({int(indptr[row])} -> {int(indptr[row + 1])}); "
              "they must be non-decreasing", name=name, row=row)
    if int(indptr[-1]) != count:
        _fail(f"{name} row pointers end at {int(indptr[-1])} but there are {count} nonzeros", name=name)
    check_indices(f"{name} column indices", indices, cols)


def check_bitmask(name: str, bits: np.ndarray, elements: int, nnz: int, bitorder: str = "big") -> None:
    """A packed bitmask (np.packbits, uint8, of ``bitorder``) of ``elements`` bits with exactly ``nnz`` bits
    set and no set bits in the padding of the last byte; checked on the packed bytes, before anything is unpacked."""
    check_dtype(name, bits, (np.uint8,))
    need = (int(elements) + 7) // 8
    if bits.size != need:
        _fail(f"{name} has {bits.size} bytes for {elements} bits (expected {need})", name=name)
    if need and elements % 8:
        low = (1 << (8 - elements % 8)) - 1  # big: the padding is the low bits; little: the high ones
        pad = int(bits.reshape(-1)[-1]) & (low if bitorder == "big" else 0xFF ^ ((1 << (elements % 8)) - 1))
        if pad:
            _fail(f"{name} has bits set past its {elements} weights", name=name)
    count = _popcount(bits)
    if count != nnz:
        _fail(f"{name} sets {count} bits but stores {nnz} values", name=name, bits_set=count, values=int(nnz))


_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(bits: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one vectorised pass, no lookup
        return int(np.bitwise_count(bits.reshape(-1)).sum(dtype=np.int64))
    total = 0
    flat = bits.reshape(-1)
    for start in range(0, flat.size, 1 << 22):  # bounded temporaries
        total += int(_POP8[flat[start:start + (1 << 22)]].sum(dtype=np.int64))
    return total


def check_nm_codes(name: str, codes: np.ndarray, n: int, m: int) -> None:
    """N:M group codes: n and m sane (0 < n <= m <= 256, codes are uint8) and every code in [0, m) (a position
    within its group of m inputs), the n codes of each group distinct (a repeated position would add two
    stored values into one weight)."""
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 0 < n <= m <= 256):
        _fail(f"{name} has N:M = {n}:{m}; need 0 < N <= M <= 256", name=name, n=n, m=m)
    check_indices(f"{name} group codes", codes, int(m))
    if codes.size % n:
        _fail(f"{name} holds {codes.size} codes, not a multiple of N={n}", name=name)
    if n > 1 and codes.size:
        groups = np.sort(codes.reshape(-1, n).astype(np.int16), axis=1)
        if (np.diff(groups, axis=1) == 0).any():
            _fail(f"{name} has a group that names one position twice", name=name)


def check_block_indices(name: str, indices: np.ndarray, n_blocks: int) -> None:
    """Block (BSR) column indices in [0, n_blocks)."""
    check_indices(f"{name} block indices", indices, int(n_blocks))


# -- the compiled layers' buffers (torch callers pass ``t.detach().cpu().numpy()``) -------------------------------
def unsigned16(indices: np.ndarray) -> np.ndarray:
    """Column indices < 65536 stored as int16 (the kernels read them as unsigned): their uint16 view."""
    return indices.view(np.uint16) if indices.dtype == np.int16 else indices


def check_csr_weight(name: str, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                     out_features: int, in_features: int) -> None:
    """A CSRWeight (inference) or SparseLinear (training) layer: indptr int64 [out+1]; indices int16 (read as
    uint16, when in <= 65536), int32, or int64 (SparseLinear) in [0, in); values [nnz]."""
    out_features, in_features = check_shape(name, [out_features, in_features], ndim=2)
    check_dtype(f"{name} column indices", indices, (np.int16, np.uint16, np.int32, np.int64))
    if indices.dtype in (np.int16, np.uint16) and in_features > 65536:
        _fail(f"{name} has 16-bit column indices for {in_features} inputs", name=name)
    check_size(f"{name} values", values, indices.size)
    check_csr(name, indptr.reshape(-1), unsigned16(indices.reshape(-1)), out_features, in_features)


def check_nm_weight(name: str, values: np.ndarray, offsets: np.ndarray, n: int, m: int,
                    out_features: int, in_features: int) -> None:
    """An NMWeight: in divisible by m, values and offsets both [out, in/m*n], offsets in [0, m) distinct per group."""
    out_features, in_features = check_shape(name, [out_features, in_features], ndim=2)
    if not (isinstance(m, (int, np.integer)) and m > 0) or in_features % m:
        _fail(f"{name}: {n}:{m} does not tile {in_features} inputs", name=name)
    want = out_features * (in_features // m) * n
    check_size(f"{name} values", values, want)
    check_size(f"{name} offsets", offsets, want)
    check_dtype(f"{name} offsets", offsets, (np.uint8,))
    check_nm_codes(name, offsets.reshape(-1), n, m)


def check_bsr_weight(name: str, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                     out_features: int, in_features: int) -> None:
    """A BSRWeight: values [nblocks, R, C] with R | out and C | in; indptr over the out/R block rows; block
    column indices (int16 read as uint16, or int32) in [0, in/C)."""
    out_features, in_features = check_shape(name, [out_features, in_features], ndim=2)
    if values.ndim != 3:
        _fail(f"{name} values have shape {list(values.shape)}, expected [blocks, R, C]", name=name)
    nblocks, r, c = (int(d) for d in values.shape)
    if r <= 0 or c <= 0 or out_features % r or in_features % c:
        _fail(f"{name}: block {r}x{c} does not tile a {out_features}x{in_features} weight", name=name)
    check_dtype(f"{name} block indices", indices, (np.int16, np.uint16, np.int32, np.int64))
    check_csr(name, indptr.reshape(-1), unsigned16(indices.reshape(-1)), out_features // r, in_features // c,
              nnz=nblocks)


def _row_popcounts(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a 2-D integer array (int16 words read as uint16)."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], -1)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(as_bytes).sum(axis=1, dtype=np.int64)
    return _POP8[as_bytes].sum(axis=1, dtype=np.int64)


def check_bitmask_weight(name: str, mask: np.ndarray | None, row_start: np.ndarray, values: np.ndarray,
                         out_features: int, in_features: int, scales: np.ndarray | None = None, group: int = 0) -> None:
    """A BitmaskWeight: mask int16 [out, ceil(in/16)] (None: every weight kept) with no bits past ``in``;
    row_start int64 [out+1] from 0, non-decreasing, each row's step equal to that row's set bits and the last
    equal to values.size; int8 values need scales [out, ceil(in/group)] with group a positive multiple of 16."""
    out_features, in_features = check_shape(name, [out_features, in_features], ndim=2)
    words = (in_features + 15) // 16
    check_dtype(f"{name} row starts", row_start, (np.int64,))
    if row_start.ndim != 1 or row_start.size != out_features + 1:
        _fail(f"{name} has {row_start.size} row starts for {out_features} rows (expected {out_features + 1})",
              name=name)
    if mask is None:
        counts = np.full(out_features, in_features, np.int64)
    else:
        check_dtype(f"{name} mask", mask, (np.int16, np.uint16))
        if mask.shape != (out_features, words):
            _fail(f"{name} mask has shape {list(mask.shape)}, expected [{out_features}, {words}]", name=name)
        if in_features % 16 and out_features:
            past = (mask[:, -1].view(np.uint16).astype(np.int64) >> (in_features % 16)) != 0
            if past.any():
                _fail(f"{name} mask sets bits past its {in_features} inputs in row {int(np.flatnonzero(past)[0])}",
                      name=name)
        counts = _row_popcounts(mask)
    if int(row_start[0]) != 0:
        _fail(f"{name} row starts begin at {int(row_start[0])}, expected 0", name=name)
    steps = np.diff(row_start)
    if (steps != counts).any():
        row = int(np.flatnonzero(steps != counts)[0])
        _fail(f"{name} row {row} keeps {int(counts[row])} weights by its mask but its row starts give "
              f"{int(steps[row])}", name=name, row=row)
    check_size(f"{name} values", values, int(row_start[-1]))
    if values.dtype == np.int8:
        if scales is None or not (isinstance(group, (int, np.integer)) and group > 0 and group % 16 == 0):
            _fail(f"{name} has int8 values but no scales or a bad group size {group!r}", name=name)
        groups = -(-in_features // int(group))
        if scales.shape != (out_features, groups):
            _fail(f"{name} scales have shape {list(scales.shape)}, expected [{out_features}, {groups}]", name=name)
        if not np.isfinite(scales).all():
            _fail(f"{name} scales hold NaN or infinite values", name=name)
