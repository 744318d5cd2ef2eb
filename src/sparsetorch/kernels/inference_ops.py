"""Calls into the compiled inference kernels (``sparsetorch.kernels._C``, built from csrc/ by setup.py).

The extension takes raw buffer addresses, so this module is the only place that calls it: it checks
dtypes, shapes and contiguity, allocates the output and keeps every tensor alive during the call.
``SPARSETORCH_DISABLE_EXT=1`` hides the extension (everything falls back to torch sparse kernels);
``SPARSETORCH_ISA=generic|avx2|avx512`` caps the instruction set it uses.
"""
from __future__ import annotations

import threading
import time

import torch

from ..errors import SparsityError
from . import loader

ISAS = loader.ISAS
# bitmask value type codes (csrc/decode.h) by values dtype
BITMASK_VTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
_SCRATCH = threading.local()


def _load():
    return loader.load(loader.INFERENCE)


def available() -> bool:
    """Whether the compiled kernels are built and not disabled by SPARSETORCH_DISABLE_EXT=1."""
    return loader.available(loader.INFERENCE)


def best_isa() -> str | None:
    """The instruction set the kernels use on this CPU (None without the extension)."""
    return loader.best_isa(loader.INFERENCE)


def refresh() -> None:
    """Re-read SPARSETORCH_ISA (the ISA level is cached for speed)."""
    loader.refresh()


def isa_level() -> int:
    """The ISA level the kernels run at (best here, capped by SPARSETORCH_ISA)."""
    return loader.isa_level(loader.INFERENCE)


def _isa_level(isa: str | None) -> int:
    level = isa_level()
    return level if isa is None else min(level, ISAS.index(isa))


def default_tile(in_features: int) -> int:
    """Batch tile in 16-column vectors for one layer (see loader.batch_tile)."""
    return loader.batch_tile(in_features)


def chain_tile(widest: int) -> int:
    """Batch panel of a fused chain: two ping-pong panels of the widest layer fit in L2."""
    return loader.batch_tile(widest, panels=2)


def make_chain(specs: list[tuple]):
    """Native fused chain from per-layer (kind, activation code, bias address, *static) tuples; the caller
    keeps every buffer alive and unchanged while the chain is used (see sparsetorch.inference.fused_chain.FusedChain)."""
    return _load().Chain(list(specs))


def call(kind: str, static: tuple, x: torch.Tensor, bias: torch.Tensor | None, *, threads: int | None = None,
         tile: int | None = None, isa: str | None = None) -> torch.Tensor:
    """Run kernel ``kind`` ("csr_linear", "nm_linear", "bsr_linear"): static = (out, in, *weight arrays'
    addresses and sizes) as the kernel takes them; x [B, in] float32 CPU; returns Y [B, out]."""
    out_features, in_features = static[0], static[1]
    if x.dim() != 2 or x.shape[1] != in_features:
        raise SparsityError(f"expected x of shape [B, {in_features}], got {tuple(x.shape)}; reshape the input to 2-D")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise SparsityError(f"compiled kernels take float32 CPU inputs, got {x.dtype} on {x.device}; use x.float().cpu()")
    if x.stride(1) != 1 or x.stride(0) < in_features:
        x = x.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != out_features):
        raise SparsityError(f"bias must be a contiguous float32 vector of {out_features} values; use bias.float().contiguous()")
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if x.shape[0]:
        getattr(_load(), kind)(_isa_level(isa), threads or torch.get_num_threads(), tile or default_tile(in_features),
                               *static, x.data_ptr(), x.shape[0], x.stride(0), _addr(bias), y.data_ptr())
    return y


def fast_path(kind: str, static: tuple, in_features: int) -> tuple:
    """(function, isa level, tile, static) for repeated calls with fixed weights: see ``call_fast``."""
    return getattr(_load(), kind), _isa_level(None), default_tile(in_features), static


def call_fast(fast: tuple, x: torch.Tensor, bias_addr: int, out_features: int,
              threads: int | None = None) -> torch.Tensor | None:
    """Kernel call with only the per-call checks (None if x needs the general path: not float32 CPU 2-D
    with unit last stride). bias_addr must point at a live contiguous float32 bias (or be 0)."""
    fn, level, tile, static = fast
    if (x.dtype is not torch.float32 or x.dim() != 2 or x.shape[1] != static[1] or x.stride(1) != 1
            or x.stride(0) < static[1] or x.device.type != "cpu" or x.shape[0] == 0):
        return None
    y = torch.empty(x.shape[0], out_features)
    fn(level, threads or torch.get_num_threads(), tile, *static, x.data_ptr(), x.shape[0], x.stride(0), bias_addr, y.data_ptr())
    return y


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _bits(indices: torch.Tensor) -> int:
    return {torch.int16: 16, torch.int32: 32}[indices.dtype]


def csr_static(indptr, indices, values, out_features, in_features) -> tuple:
    return (out_features, in_features, indptr.data_ptr(), indices.data_ptr(), _bits(indices), values.data_ptr(),
            values.numel())


def nm_static(values, offsets, n, m, in_features) -> tuple:
    return (values.shape[0], in_features, n, m, values.data_ptr(), offsets.data_ptr())


def bsr_static(indptr, indices, values, out_features, in_features) -> tuple:
    nblocks, r, c = values.shape
    return (out_features, in_features, r, c, indptr.data_ptr(), indices.data_ptr(), _bits(indices),
            values.data_ptr(), nblocks)


def bitmask_static(out_features: int, in_features: int, mask, row_start, values, scales, group: int,
                   quantize_input: bool) -> tuple:
    """The bitmask kernel's weight arguments (see kernels.bitmask_weight for the layout); mask None = dense."""
    return (out_features, in_features, _addr(mask), (in_features + 15) // 16, row_start.data_ptr(), values.data_ptr(),
            BITMASK_VTYPES[values.dtype], _addr(scales), group, int(quantize_input))


def bitmask_to_dense(static: tuple, out: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Rebuild the dense fp32 weight [out, in] of a bitmask weight into ``out`` (contiguous fp32, at least
    out * in elements; its leading view is returned)."""
    n = static[0] * static[1]
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n:
        raise SparsityError(f"unpack needs a contiguous fp32 buffer of at least {n} elements", got=tuple(out.shape))
    dense = out.view(-1)[:n].view(static[0], static[1])
    _load().bitmask_to_dense(isa_level(), threads or torch.get_num_threads(), *static[:9], dense.data_ptr())
    return dense


def scratch(n: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least n elements, grown as needed and then reused (a fresh allocation's
    page faults cost more than the unpack that fills it)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        _SCRATCH.buf = buf = torch.empty(n)
    return buf


def bitmask_many(static: tuple, x: torch.Tensor, bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """x [B, in] @ W^T + bias for many rows on the sparse x dense kernel: X transposed in panels of 64 rows,
    each kept weight broadcast into them (only the kept multiply-adds; fp32 activations)."""
    x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty(x.shape[0], static[0])
    _load().bitmask_linear_many(isa_level(), threads or torch.get_num_threads(), *static[:9], x.data_ptr(), x.shape[0],
                                x.stride(0), _addr(bias), y.data_ptr())
    return y


def bitmask_unpacked_gemm(static: tuple, x: torch.Tensor, bias: torch.Tensor | None,
                          threads: int | None = None) -> torch.Tensor:
    """x [B, in] @ W^T + bias as one dense GEMM over the weight rebuilt in a reused buffer (the rebuild is one
    pass, ~1/30 of the GEMM at 512 rows)."""
    dense = bitmask_to_dense(static, scratch(static[0] * static[1]), threads)
    return torch.nn.functional.linear(x.float(), dense, None if bias is None else bias.float())


def sparsify_input(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """x with the entries of magnitude at most ``threshold`` set to zero."""
    # TEAL (Liu et al. 2024, eq. 1): s_t(x) = x if |x| > t else 0
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def colmask_static(out_features: int, in_features: int, mask, start, values, scales, threshold,
                   skip_columns: bool) -> tuple:
    """The column (activation-sparse) kernels' weight arguments (see kernels.column_bitmask for the layout)."""
    return (out_features, in_features, mask.data_ptr(), start.data_ptr(), values.data_ptr(),
            BITMASK_VTYPES[values.dtype], _addr(scales), float(threshold), int(skip_columns), 0)


def colmask_to_dense_t(static: tuple, out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """W^T [in, out] fp32 of a column weight, rebuilt into ``out`` (a new tensor if None; else contiguous fp32
    of at least out * in elements, whose leading view is returned)."""
    n = static[0] * static[1]
    out = torch.empty(n) if out is None else out
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n:
        raise SparsityError(f"unpack_t needs a contiguous fp32 buffer of at least {n} elements", got=tuple(out.shape))
    dense_t = out.view(-1)[:n].view(static[1], static[0])
    _load().colmask_to_dense_t(isa_level(), threads or torch.get_num_threads(), *static[:7], dense_t.data_ptr())
    return dense_t


def colmask_prefill(static: tuple, x: torch.Tensor, bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """Many rows: sparsify_input(x) @ W^T + bias as one dense GEMM over W^T rebuilt in a reused buffer."""
    y = sparsify_input(x.float(), static[7]) @ colmask_to_dense_t(static, scratch(static[0] * static[1]), threads)
    return y if bias is None else y + bias.float()


def coldense_static(out_features: int, in_features: int, values, scales, threshold) -> tuple:
    """The column kernel's arguments for dense columns (kernels.dense_columns): no mask, no starts; values [in, out]
    with unit stride along out (columns values.stride(0) apart: a view of a sibling group's columns)."""
    if values.shape != (in_features, out_features) or values.stride(1) != 1 or values.stride(0) < out_features:
        raise SparsityError(f"dense columns need values [{in_features}, {out_features}] with unit stride along out",
                            shape=tuple(values.shape), strides=values.stride())
    if (values.dtype == torch.int8) != (scales is not None) or (scales is not None and (
            scales.dtype != torch.float32 or scales.shape != (out_features,) or scales.stride(0) != 1)):
        raise SparsityError(f"dense columns need {out_features} float32 scales with int8 values, none otherwise",
                            scales=None if scales is None else tuple(scales.shape))
    return (out_features, in_features, 0, 0, values.data_ptr(), BITMASK_VTYPES[values.dtype], _addr(scales),
            float(threshold), 1, values.stride(0))


def coldense_prefill(values: torch.Tensor, scales: torch.Tensor | None, threshold, x: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Many rows: sparsify_input(x) @ W^T + bias as one dense GEMM over W^T [in, out] (values times their
    scales, in a reused buffer)."""
    if scales is None and values.dtype == torch.float32:
        w_t = values  # already W^T (a group's view: matmul takes its strides)
    else:
        n = values.numel()
        w_t = scratch(n)[:n].view(values.shape)  # contiguous, whatever the stride of values
        w_t = torch.mul(values, scales, out=w_t) if scales is not None else w_t.copy_(values)
    y = sparsify_input(x.float(), threshold) @ w_t
    return y if bias is None else y + bias.float()


# Prefill kernel per weight (keyed by its kernel arguments) and batch size class, chosen by timing both the
# first time: the sparse x dense kernel does only the kept multiply-adds but one load per multiply-add, a
# tuned dense GEMM (MKL) reuses registers; which wins depends on density, shape and CPU.
_PREFILL_CHOICE: dict[tuple, str] = {}


def bitmask_prefill(static: tuple, x: torch.Tensor, bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """x [B, in] @ W^T + bias for many rows: ``bitmask_many`` or ``bitmask_unpacked_gemm``, whichever ran faster
    on this weight's first call at this order of batch size (both are timed once, warm)."""
    key = (static, max(x.shape[0], 1).bit_length())
    choice = _PREFILL_CHOICE.get(key)
    if choice is None:
        times = {}
        for name, fn in (("spmm", bitmask_many), ("gemm", bitmask_unpacked_gemm)) * 2:  # the second round counts
            t0 = time.perf_counter()
            y = fn(static, x, bias, threads)
            times[name] = time.perf_counter() - t0
        choice = _PREFILL_CHOICE[key] = min(times, key=times.get)
        return y
    return (bitmask_many if choice == "spmm" else bitmask_unpacked_gemm)(static, x, bias, threads)


def bitmask_many_rows(static: tuple, mask: torch.Tensor | None, values: torch.Tensor, x: torch.Tensor,
                      bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """x [B, in] @ W^T + bias for many rows of a bitmask weight (``static`` from bitmask_static). A dense fp32
    weight (no mask: its values are W, e.g. an lm_head) is one GEMM on its values, rather than a copy of W into
    the scratch buffer that then stays allocated (250 MiB for a 32000 x 2048 lm_head); others bitmask_prefill."""
    if mask is None and values.dtype == torch.float32:
        w = values.view(static[0], static[1])
        return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return bitmask_prefill(static, x, bias, threads)


# Explicit entry points (tests, benchmarks). The tensors must stay alive and unchanged during the call.
def csr_linear(x, indptr, indices, values, out_features, bias=None, **kw):
    """Y [B, out] = x [B, in] @ W^T + bias for W in CSR (indptr int64, indices int16-as-uint16 or int32)."""
    return call("csr_linear", csr_static(indptr, indices, values, out_features, x.shape[-1]), x, bias, **kw)


def nm_linear(x, values, offsets, n, m, bias=None, **kw):
    """Y = x @ W^T + bias for W packed N:M: values / offsets (uint8) are [out, in/m*n]."""
    return call("nm_linear", nm_static(values, offsets, n, m, x.shape[-1]), x, bias, **kw)


def bsr_linear(x, indptr, indices, values, out_features, bias=None, **kw):
    """Y = x @ W^T + bias for W in BSR: values [nblocks, R, C], indptr over block rows (int64)."""
    return call("bsr_linear", bsr_static(indptr, indices, values, out_features, x.shape[-1]), x, bias, **kw)
