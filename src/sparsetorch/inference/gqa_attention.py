"""Decode attention of grouped-query models that reads the KV cache as it is, compiled or not.

For one query token, transformers' ``sdpa`` attention lays the query heads that share a key/value head side by
side ([b, heads, 1, d] -> [b, kv_heads, group, d]) so that SDPA reads each cached key and value once, but only
when not compiling: a compiled decode step repeats every key/value head ``group`` times instead, copying the
whole static cache in every layer at every token. Between two layers' attention the weight stream has evicted
that cache, so the copy and the SDPA that reads it come from memory. On the 1B preset of bench_decode (4 kv
heads for 32 query heads, 70% int8, 2 threads, 128-token prompt) the compiled decode step took 37.1-43.0 ms
per token with ``sdpa`` and 32.9-35.7 ms with this, 1.17x (``benchmarks/bench_gqa_attention.py --rounds 3``).
The math is ``sdpa``'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION", "packed_decode_attention", "use_packed_decode_attention"]

ATTENTION = "sparsetorch_sdpa"  # the name under which transformers finds this attention (and sdpa's masks)


def packed_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [b, h, q, d], key/value [b, kv, L, d] -> ([b, q, h, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    group = getattr(module, "num_key_value_groups", 1)
    b, h, q, d = query.shape
    if q != 1 or group == 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:  # a mask per query head: grouped like the heads
        mask = mask.reshape(mask.shape[0], h // group, group, mask.shape[-1])
    out = F.scaled_dot_product_attention(query.reshape(b, h // group, group, d), key, value, attn_mask=mask,
                                         scale=scaling)  # [b, kv, group, d]: group g of head k is query head k*group+g
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


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
