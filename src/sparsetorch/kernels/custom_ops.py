"""The compiled Linear kernels as PyTorch operators (``torch.ops.sparsetorch.*``), so ``torch.compile`` traces them.

The extension takes raw addresses, which torch.compile cannot trace (``data_ptr()`` breaks the graph). These
operators take the weight's buffers as tensors instead; each has a fake (meta) version giving the output's
shape, so Dynamo and Inductor keep a converted model in one graph and call the kernel as an opaque op.
Eager ``PackedLinear`` calls keep their cheaper direct path (``inference_ops.call_fast``); the operators
cost a few microseconds more per call through the dispatcher and are what compiled code calls. They are
defined with ``torch.library.Library`` (a CPU kernel + a fake), not ``torch.library.custom_op``, whose
Python wrapper layers cost about 25 us more per call (measured: 43 us against 17 us for a 128 x 128 layer).

Each returns a new float32 tensor [B, out]; ``threads`` 0 follows ``torch.get_num_threads()`` at run time.
"""
from typing import Optional

import torch
from torch import Tensor

from . import decode_attention as attention
from . import inference_ops, loader

__all__ = ["bitmask_linear", "csr_linear", "nm_linear", "bsr_linear", "colmask_linear", "decode_attention"]


def _run(kind: str, static: tuple, x: Tensor, bias: Optional[Tensor], threads: int) -> Tensor:
    """The kernel on x [B, in]: the cheap checks of ``call_fast`` when x is a plain fp32 matrix, else the general
    ``call`` (converts x, rejects a wrong shape with SparsityError)."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != static[0]):
        bias = bias.float().contiguous()  # a wrong size is rejected by call() below
        return inference_ops.call(kind, static, x.float(), bias, threads=threads or None)
    y = inference_ops.call_fast(inference_ops.fast_path(kind, static, static[1]), x,
                                0 if bias is None else bias.data_ptr(), static[0], threads or None)
    return y if y is not None else inference_ops.call(kind, static, x.float(), bias, threads=threads or None)


_SCHEMAS = {
    "bitmask_linear": "(Tensor x, Tensor? mask, Tensor row_start, Tensor values, Tensor? scales, Tensor? bias, "
                      "int in_features, int out_features, int group, bool quantize_input, int threads)",
    "csr_linear": "(Tensor x, Tensor indptr, Tensor indices, Tensor values, Tensor? bias, int in_features, "
                  "int out_features, int threads)",
    "nm_linear": "(Tensor x, Tensor values, Tensor offsets, Tensor? bias, int in_features, int n, int m, int threads)",
    "bsr_linear": "(Tensor x, Tensor indptr, Tensor indices, Tensor values, Tensor? bias, int in_features, "
                  "int out_features, int threads)",
    "colmask_linear": "(Tensor x, Tensor mask, Tensor start, Tensor values, Tensor? scales, Tensor threshold, "
                      "Tensor? bias, int in_features, int out_features, bool skip_columns, int threads)",
    "decode_attention": "(Tensor query, Tensor key, Tensor value, Tensor? keep, float scale, int threads)",
}


def _bitmask(x, mask, row_start, values, scales, bias, in_features, out_features, group, quantize_input,
             threads):
    static = inference_ops.bitmask_static(out_features, in_features, mask, row_start, values, scales, group, quantize_input)
    if x.shape[0] >= loader.BITMASK_MANY_ROWS and x.dim() == 2 and x.shape[1] == in_features:
        return inference_ops.bitmask_many_rows(static, mask, values, x, bias, threads or None)
    return _run("bitmask_linear", static, x, bias, threads)


def _csr(x, indptr, indices, values, bias, in_features, out_features, threads):
    static = inference_ops.csr_static(indptr, indices, values, out_features, in_features)
    return _run("csr_linear", static, x, bias, threads)


def _nm(x, values, offsets, bias, in_features, n, m, threads):
    static = inference_ops.nm_static(values, offsets, n, m, in_features)
    return _run("nm_linear", static, x, bias, threads)


def _bsr(x, indptr, indices, values, bias, in_features, out_features, threads):
    static = inference_ops.bsr_static(indptr, indices, values, out_features, in_features)
    return _run("bsr_linear", static, x, bias, threads)


def _colmask(x, mask, start, values, scales, threshold, bias, in_features, out_features, skip_columns, threads):
    prefill = x.shape[0] >= loader.BITMASK_PREFILL_ROWS and x.dim() == 2 and x.shape[1] == in_features
    if mask.numel() == 0:  # dense columns (kernels.dense_columns): W^T, no mask
        if prefill:
            return inference_ops.coldense_prefill(values, scales, threshold, x, bias)
        return _run("colmask_linear", inference_ops.coldense_static(out_features, in_features, values, scales,
                                                                    threshold), x, bias, threads)
    static = inference_ops.colmask_static(out_features, in_features, mask, start, values, scales, threshold,
                                          skip_columns)
    if prefill:
        return inference_ops.colmask_prefill(static, x, bias, threads or None)
    return _run("colmask_linear", static, x, bias, threads)


def _output(x: Tensor, in_features: int, out_features: int) -> Tensor:
    """What tracing sees: fp32 [B, out] for x [B, in]."""
    torch._check(x.dim() == 2 and x.shape[1] == in_features,
                 lambda: f"expected x of shape [B, {in_features}], got {tuple(x.shape)}")
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


_KERNELS = {"bitmask_linear": _bitmask, "csr_linear": _csr, "nm_linear": _nm, "bsr_linear": _bsr,
            "colmask_linear": _colmask, "decode_attention": attention.decode_attention}
_FAKES = {
    "bitmask_linear": lambda x, mask, row_start, values, scales, bias, in_features, out_features, *_: (
        _output(x, in_features, out_features)),
    "csr_linear": lambda x, indptr, indices, values, bias, in_features, out_features, threads: (
        _output(x, in_features, out_features)),
    "nm_linear": lambda x, values, offsets, bias, in_features, n, m, threads: _output(x, in_features, values.shape[0]),
    "bsr_linear": lambda x, indptr, indices, values, bias, in_features, out_features, threads: (
        _output(x, in_features, out_features)),
    "colmask_linear": lambda x, mask, start, values, scales, threshold, bias, in_features, out_features, *_: (
        _output(x, in_features, out_features)),
    "decode_attention": lambda query, key, value, *_: query.new_empty(
        (query.shape[0], query.shape[1] * query.shape[2], value.shape[3])),
}


def _register() -> torch.library.Library | None:
    """Define the operators once per process (a second copy of this module, e.g. a reload, reuses them)."""
    try:
        torch.ops.sparsetorch.bitmask_linear  # noqa: B018
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("sparsetorch", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        lib.define(name + schema + " -> Tensor")
        lib.impl(name, _KERNELS[name], "CPU")
        torch.library.register_fake(f"sparsetorch::{name}", _FAKES[name], lib=lib)
    return lib


_LIB = _register()  # kept alive: the registrations last as long as this object


def bitmask_linear(x: Tensor, mask: Optional[Tensor], row_start: Tensor, values: Tensor, scales: Optional[Tensor],
                   bias: Optional[Tensor], in_features: int, out_features: int, group: int,
                   quantize_input: bool, threads: int = 0) -> Tensor:
    """x [B, in] @ W^T + bias for a bitmask weight (kernels.bitmask_weight); mask None = a dense layer."""
    return torch.ops.sparsetorch.bitmask_linear(x, mask, row_start, values, scales, bias, in_features,
                                                out_features, group, quantize_input, threads)


def csr_linear(x: Tensor, indptr: Tensor, indices: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int,
               out_features: int, threads: int = 0) -> Tensor:
    """x [B, in] @ W^T + bias for W in CSR (kernels.packed.CSRWeight)."""
    return torch.ops.sparsetorch.csr_linear(x, indptr, indices, values, bias, in_features, out_features, threads)


def nm_linear(x: Tensor, values: Tensor, offsets: Tensor, bias: Optional[Tensor], in_features: int, n: int, m: int,
              threads: int = 0) -> Tensor:
    """x [B, in] @ W^T + bias for W packed N:M (kernels.packed.NMWeight); out = values.shape[0]."""
    return torch.ops.sparsetorch.nm_linear(x, values, offsets, bias, in_features, n, m, threads)


def colmask_linear(x: Tensor, mask: Tensor, start: Tensor, values: Tensor, scales: Optional[Tensor], threshold: Tensor,
                   bias: Optional[Tensor], in_features: int, out_features: int, skip_columns: bool,
                   threads: int = 0) -> Tensor:
    """sparsify_input(x, threshold) [B, in] @ W^T + bias for W stored by columns (kernels.column_bitmask)."""
    return torch.ops.sparsetorch.colmask_linear(x, mask, start, values, scales, threshold, bias, in_features,
                                                out_features, skip_columns, threads)


def bsr_linear(x: Tensor, indptr: Tensor, indices: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int,
               out_features: int, threads: int = 0) -> Tensor:
    """x [B, in] @ W^T + bias for W in BSR (kernels.packed.BSRWeight)."""
    return torch.ops.sparsetorch.bsr_linear(x, indptr, indices, values, bias, in_features, out_features, threads)


def decode_attention(query: Tensor, key: Tensor, value: Tensor, keep: Optional[Tensor], scale: float,
                     threads: int = 0) -> Tensor:
    """One query token's attention (kernels.decode_attention): query [b, kv, group, d], key/value [b, kv, L, d],
    keep [b, L] bool or None -> [b, kv * group, dv]."""
    return torch.ops.sparsetorch.decode_attention(query, key, value, keep, scale, threads)
