"""Calls into the optional compiled training kernels (``sparsetorch.kernels._train``, csrc/train_*.cpp).

The extension takes raw buffer addresses; this module is the only place that calls it. It checks dtypes
and contiguity, allocates every output and keeps the tensors alive for the duration of each call.
``SPARSETORCH_DISABLE_EXT=1`` hides it (SparseLinear then runs on torch sparse CSR ops) and
``SPARSETORCH_ISA=generic|avx2|avx512`` caps the instruction set, as for the inference kernels.

Dense operands are handed to the kernels as "panels": X [B, n] transposed into ceil(B / tw) contiguous
[n, tw] blocks (batch zero-padded), so that each nonzero works on tw consecutive batch values.
"""
from __future__ import annotations

import torch

from ..errors import SparsityError
from . import loader

ISAS = loader.ISAS
DTYPES = {torch.float32: 0, torch.float64: 1}


def _load():
    return loader.load(loader.TRAINING)


def available() -> bool:
    """Whether the compiled training kernels are built and not disabled by SPARSETORCH_DISABLE_EXT=1."""
    return loader.available(loader.TRAINING)


def isa_level() -> int:
    return loader.isa_level(loader.TRAINING)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels can take this input (CPU, float32/float64) in this process."""
    return x.device.type == "cpu" and x.dtype in DTYPES and available()


def panel_width(batch: int) -> int:
    """Batch columns per panel: the batch rounded up to a power of two in [16, 256]. Wide panels amortise the
    horizontal sums of the SDDMM and the per-row loop overheads; each nonzero still reads one contiguous
    run of tw values (measured on a 4096x4096 layer, B=256: tw=256 beat 32/64/128 for fwd+bwd)."""
    tw = 16
    while tw < batch and tw < 256:
        tw *= 2
    return tw


# Panels are scratch: a freshly allocated multi-MB tensor costs a page fault per 4 KB on first touch, as much
# as the whole sparse product at 99% sparsity. Finished panels go back to this pool and are reused. The pool
# holds at most _POOL_BYTES: enough for a layer's two panels in flight (4096 features x 256 batch columns),
# little next to a model's activations (a 38M GPT at 2048 tokens held 36 MB idle at its peak without the cap).
_POOL: dict[tuple, list[torch.Tensor]] = {}
_POOL_PER_SHAPE = 64
_POOL_BYTES = 8 << 20
_pooled = 0  # bytes held by _POOL


def scratch(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, reused from the pool when one of this shape is free."""
    global _pooled
    free = _POOL.get((shape, dtype))
    if not free:
        return torch.empty(shape, dtype=dtype)
    t = free.pop()
    _pooled -= t.numel() * t.element_size()
    return t


def release(*tensors: torch.Tensor | None) -> None:
    """Give scratch tensors back (the caller must not use them afterwards)."""
    global _pooled
    for t in tensors:
        if t is not None:
            free = _POOL.setdefault((tuple(t.shape), t.dtype), [])
            size = t.numel() * t.element_size()
            if len(free) < _POOL_PER_SHAPE and _pooled + size <= _POOL_BYTES:
                free.append(t)
                _pooled += size


def pack(x: torch.Tensor, tw: int) -> torch.Tensor:
    """x [B, n] (unit column stride) -> panels [ceil(B/tw), n, tw] (scratch: ``release`` when done)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):  # e.g. a broadcast (expanded) grad
        x = x.contiguous()
    b, n = x.shape
    out = scratch(((b + tw - 1) // tw, n, tw), x.dtype)
    _load().pack(torch.get_num_threads(), DTYPES[x.dtype], x.data_ptr(), b, n, max(x.stride(0), n), out.data_ptr(), tw)
    return out


def unpack(panels: torch.Tensor, batch: int, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """panels [P, n, tw] -> [batch, n] (+ bias), written into ``out`` (contiguous [batch, n]) when given."""
    _, n, tw = panels.shape
    if out is None:
        out = torch.empty(batch, n, dtype=panels.dtype)
    elif not out.is_contiguous() or tuple(out.shape) != (batch, n) or out.dtype != panels.dtype:
        raise SparsityError(f"unpack: out must be a contiguous [{batch}, {n}] {panels.dtype} tensor; allocate it with torch.empty")
    bias_addr = 0
    if bias is not None:
        bias = bias.detach().to(panels.dtype).contiguous()
        bias_addr = bias.data_ptr()
    _load().unpack(torch.get_num_threads(), DTYPES[panels.dtype], panels.data_ptr(), batch, n, tw, out.data_ptr(),
                   bias_addr)
    return out


def _bits(indices: torch.Tensor) -> int:
    return 16 if indices.dtype == torch.int16 else 32


def spmm(rows: int, indptr: torch.Tensor, indices: torch.Tensor, vmap: torch.Tensor | None, values: torch.Tensor,
         src: torch.Tensor) -> torch.Tensor:
    """dst panels [P, rows, tw] = W @ src panels [P, n, tw], W given by (indptr, indices, values[vmap])
    (scratch: ``release`` when done)."""
    p, n, tw = src.shape
    dst = scratch((p, rows, tw), src.dtype)
    _load().spmm(isa_level(), torch.get_num_threads(), DTYPES[src.dtype], rows, indptr.data_ptr(), indices.data_ptr(),
                 _bits(indices), 0 if vmap is None else vmap.data_ptr(), values.data_ptr(), src.data_ptr(), n,
                 dst.data_ptr(), tw, p)
    return dst


def spmm_t(cols: int, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
           src: torch.Tensor) -> torch.Tensor:
    """dst panels [P, cols, tw] = W^T @ src panels [P, rows, tw] for W [rows, cols] in CSR, read by rows (a
    scatter: no transposed index map). Scratch: ``release`` when done."""
    p, rows, tw = src.shape
    dst = scratch((p, cols, tw), src.dtype)
    _load().spmm_t(isa_level(), torch.get_num_threads(), DTYPES[src.dtype], rows, indptr.data_ptr(),
                   indices.data_ptr(), _bits(indices), values.data_ptr(), src.data_ptr(), dst.data_ptr(), cols, tw, p)
    return dst


def sddmm(indptr: torch.Tensor, indices: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dw[k] = <a row r_k, b row c_k> over the whole batch for each nonzero k = (r_k, c_k); a, b are panels."""
    p, rows, tw = a.shape
    dw = torch.empty(indices.numel(), dtype=a.dtype)
    if dw.numel():
        _load().sddmm(isa_level(), torch.get_num_threads(), DTYPES[a.dtype], rows, indptr.data_ptr(),
                      indices.data_ptr(), _bits(indices), a.data_ptr(), b.data_ptr(), b.shape[1], dw.data_ptr(), tw, p)
    return dw
