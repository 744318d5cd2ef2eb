"""Attention of one query token over a KV cache on the compiled kernel (csrc/attention.inc).

At decode SDPA costs ~60 us warm and ~130 us with the cache out of cache per layer on the 1B preset's shapes
(32 query heads over 4 key/value heads, 256 cached rows, 2 threads), for ~1 M multiply-adds: its fixed costs
dominate. This kernel reads each kept key and value row once for the query heads that share it and skips the
masked rows of a static cache (``benchmarks/bench_gqa_attention.py`` gives the end-to-end figure).
"""
from __future__ import annotations

import math

import torch

from ..errors import SparsityError
from . import inference_ops, loader

__all__ = ["decode_attention", "supported"]


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the extension is built and enabled; a constant to torch.compile, which would otherwise break the
    graph on the check's environment read and cached import."""
    return inference_ops.available()


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """Whether ``decode_attention`` runs these (fp32 CPU, unit last strides, a bool keep mask of the cache's
    length) with the extension built; otherwise use SDPA."""
    tensors = (query, key, value) if keep is None else (query, key, value, keep)
    return (_built()
            and all(t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
            and query.dtype == key.dtype == value.dtype == torch.float32
            and query.dim() == 4 and key.dim() == 4 and value.dim() == 4 and key.shape[2] > 0
            and (keep is None or (keep.dtype == torch.bool and keep.dim() == 2 and keep.shape[1] == key.shape[2])))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
                     scale: float | None = None, threads: int = 0) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query token per batch row and head.

    query [b, kv_heads, group, d] (the ``group`` query heads sharing each key/value head side by side),
    key [b, kv_heads, L, d], value [b, kv_heads, L, dv], keep [b, L] bool (True = attend; None = every row);
    scale defaults to 1/sqrt(d). Returns [b, kv_heads * group, dv] (query head k * group + g at row k, g)."""
    if not supported(query, key, value, keep):
        raise SparsityError("decode_attention takes float32 CPU tensors with unit last strides, query/key/value "
                            "4-D and keep a bool [batch, L] mask, with the compiled kernels built",
                            query=(tuple(query.shape), str(query.dtype)), key=tuple(key.shape),
                            fix="use torch.nn.functional.scaled_dot_product_attention for other inputs")
    b, kv, group, d = query.shape
    L, dv = key.shape[2], value.shape[3]
    if key.shape != (b, kv, L, d) or value.shape[:3] != (b, kv, L) or (keep is not None and keep.shape[0] != b):
        raise SparsityError("decode_attention: query, key, value and keep disagree in shape",
                            query=tuple(query.shape), key=tuple(key.shape), value=tuple(value.shape),
                            keep=None if keep is None else tuple(keep.shape))
    query = query.contiguous()
    out = query.new_empty(b, kv * group, dv)
    loader.load(loader.INFERENCE).decode_attention(
        inference_ops.isa_level(), threads or torch.get_num_threads(), query.data_ptr(), key.data_ptr(),
        value.data_ptr(), 0 if keep is None else keep.data_ptr(), b, kv, group, L, d, dv, *key.stride()[:3],
        *value.stride()[:3], 0 if keep is None else keep.stride(0), 1 / math.sqrt(d) if scale is None else scale,
        out.data_ptr())
    return out
