"""Decode attention of grouped-query models that reads the KV cache as it is, compiled or not.

For one query token, transformers' ``sdpa`` attention lays the query heads that share a key/value head side by
side ([b, heads, 1, d] -> [b, kv_heads, group, d]) so that SDPA reads each cached key and value once, but only
when not compiling: a compiled decode step repeats every key/value head ``group`` times instead, copying the
whole static cache in every layer at every token. Between two layers' attention the weight stream has evicted
that cache, so the copy and the SDPA that reads it come from memory. On the 1B preset of bench_decode (4 kv
heads for 32 query heads, 70% int8, 2 threads, 128-token prompt) the compiled decode step took 37.1-43.0 ms
per token with ``sdpa`` and 32.9-35.7 ms with this, 1.17x (``benchmarks/bench_gqa_attention.py --rounds 3``).
The math is ``sdpa``'s. In fp32 with the compiled kernels built, one query token runs on
``kernels.decode_attention`` instead (every query head of a key/value head per read of the cache, masked rows
of a static cache not read, no SDPA dispatch): on a 2-core AVX2 VM (Zen 3) the compiled 70% int8 step was within
noise of SDPA's (1.03x, ``benchmarks/results/decode_attention_1b_avx2.json``), where Linears take ~95% of it.
``to_inference`` switches decoders to it at decode, compiled or not (eager, over 2048 cached tokens, 347 vs
598 us per layer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import custom_ops, decode_attention

__all__ = ["ATTENTION", "packed_decode_attention", "use_packed_decode_attention"]

ATTENTION = "sparsetorch_sdpa"  # the name under which transformers finds this attention (and sdpa's masks)
_UNSUPPORTED = ("position_bias", "softcap", "s_aux", "sinks")  # attention variants left to transformers' sdpa


def packed_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [b, h, q, d], key/value [b, kv, L, d] -> ([b, q, h, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    kv = key.shape[1]
    if (q != 1 or dropout or h % kv or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
            or (attention_mask is not None and attention_mask.shape[1] != 1 and kv != h)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = h // kv
    keep = _keep_rows(attention_mask, b, key.shape[2])
    if keep is not False and decode_attention.supported(query, key, value, keep):  # the compiled kernel
        scale = 1 / math.sqrt(d) if scaling is None else scaling
        out = custom_ops.decode_attention(query.reshape(b, kv, group, d), key, value, keep, scale)
        return out.view(b, 1, h, value.shape[-1]), None
    if group == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(b, kv, group, d), key, value, attn_mask=attention_mask,
                                         scale=scaling)  # [b, kv, group, d]: group g of head k is query head k*group+g
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _keep_rows(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None | bool:
    """The cache rows one query token attends to, [batch, length] bool, from transformers' mask [b or 1, 1 or
    heads, 1, length]: None for every row, False for a mask the kernel does not take (additive, per head)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != length:
        return False
    return mask[:, 0, -1, :].expand(batch, length)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # without it a static cache's unfilled slots go unmasked


def use_packed_decode_attention(model: nn.Module) -> bool:
    """Switch a transformers model with grouped-query ``sdpa`` attention to ``packed_decode_attention`` (in
    place); whether it did. Other models and attention implementations are left as they are."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if (getattr(config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads or heads == kv_heads
            or not hasattr(model, "set_attn_implementation")):
        return False
    try:
        _register()
        model.set_attn_implementation(ATTENTION)
    except (ImportError, ValueError, AttributeError):  # a transformers without these interfaces
        return False
    return config._attn_implementation == ATTENTION
