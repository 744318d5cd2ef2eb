"""A Llama-style decoder (transformers ``LlamaForCausalLM``) with a KV cache, in numpy: RMSNorm, rotary positions,
grouped-query attention, a SiLU-gated MLP (SwiGLU), tied or separate output head.

The file's "llama" node names its tensors by the transformers parameter names (``model.layers.0.self_attn.q_proj.
weight``...) and lists, per block, its query heads and key/value heads: models shrunk by ``sparsetorch.shrink``
(fewer blocks, heads, MLP channels or hidden channels, per-block widths) run as they are. The rotary frequencies
are stored as the model computed them (``inv_freq``, with the config's rope_theta and any static rope scaling:
linear, llama3, yarn) together with the cos/sin factor ``attention_scaling``.
"""
from __future__ import annotations

import numpy as np

from ..errors import SparsityError
from . import ops
from .transformer import Decoder


class _LlamaBlock:
    def __init__(self, model, prefix: str, heads: int, kv_heads: int, head_dim: int, width: int, node: dict):
        a, m = f"{prefix}self_attn.", f"{prefix}mlp."

        def lin(name: str, bias: bool):
            return model.linear(f"{name}.weight", f"{name}.bias" if bias else None)
        self.norm1 = model.array(f"{prefix}input_layernorm.weight")
        self.norm2 = model.array(f"{prefix}post_attention_layernorm.weight")
        self.q, self.k, self.v, self.o = (lin(a + p, node["attention_bias"]) for p in ("q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"))
        self.gate, self.up, self.down = (lin(m + p, node["mlp_bias"]) for p in ("gate_proj", "up_proj", "down_proj"))
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        attn_ok = (heads >= 1 and kv_heads >= 1 and heads % kv_heads == 0 and self.q.out_features == heads * head_dim
                   and self.k.out_features == self.v.out_features == kv_heads * head_dim
                   and self.o.in_features == heads * head_dim)
        mlp_ok = self.gate.out_features == self.up.out_features == self.down.in_features
        inputs = {self.q.in_features, self.k.in_features, self.v.in_features, self.gate.in_features,
                  self.up.in_features, self.o.out_features, self.down.out_features, self.norm1.size, self.norm2.size}
        if not attn_ok or not mlp_ok or inputs != {width}:
            raise SparsityError(f"{prefix}: {heads} query / {kv_heads} key-value heads of size {head_dim} and width "
                                f"{width} do not fit its projections' shapes; the file is corrupted")


class LlamaDecoder(Decoder):
    """transformers' LlamaForCausalLM forward and greedy / sampled generation; positions end at the model's
    max_position_embeddings (``context``)."""

    slides = False

    def __init__(self, model, node: dict):
        p = node["prefix"]
        self.context, self.vocab, self.width = int(node["context"]), int(node["vocab"]), int(node["width"])
        self.head_dim, self.eps = int(node["head_dim"]), float(node["eps"])
        self.scaling, self.rope_scale = np.float32(node["scaling"]), np.float32(node["attention_scaling"])
        self.eos = frozenset(int(t) for t in node.get("eos", []))
        if not (0 < self.eps < 1 and np.isfinite(self.scaling) and self.scaling > 0 and np.isfinite(self.rope_scale)):
            raise SparsityError(f"the llama node has eps {self.eps}, attention scaling {self.scaling} and rotary "
                                f"scaling {self.rope_scale}; the file is corrupted")
        heads, kv = node["heads"], node["kv_heads"]
        if not (isinstance(heads, list) and isinstance(kv, list) and len(heads) == len(kv) == node["layers"]
                and all(isinstance(h, int) for h in heads + kv)) or self.head_dim < 2 or self.head_dim % 2:
            raise SparsityError(f"the llama node lists heads {heads} / {kv} for {node['layers']} blocks of head size "
                                f"{self.head_dim}; the file is corrupted")
        self.inv_freq = model.array(node["inv_freq"]).reshape(-1)
        if self.inv_freq.size != self.head_dim // 2:
            raise SparsityError(f"the llama node has {self.inv_freq.size} rotary frequencies for head size "
                                f"{self.head_dim}; the file is corrupted")
        self.embed = model.matrix(f"{p}model.embed_tokens.weight")  # rows are looked up: stays compact in memory
        self.blocks = [_LlamaBlock(model, f"{p}model.layers.{i}.", h, k, self.head_dim, self.width, node)
                       for i, (h, k) in enumerate(zip(heads, kv))]
        self.norm = model.array(f"{p}model.norm.weight")
        # a tied head multiplies by the embedding table itself: the same arrays, not a second copy
        self.lm_head = model.linear(node["lm_head"], None)
        if self.embed.shape != (self.vocab, self.width) or self.lm_head.out_features != self.vocab \
                or self.lm_head.in_features != self.width or self.norm.size != self.width:
            raise SparsityError(f"the llama node's vocabulary {self.vocab} x width {self.width} does not match its "
                                f"embedding {list(self.embed.shape)} or output head; the file is corrupted")

    def _rotary(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, D] for positions start.., as transformers' rotary embedding (float32 throughout)."""
        freqs = np.arange(start, start + length, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb) * self.rope_scale, np.sin(emb) * self.rope_scale

    def step(self, ids: np.ndarray, cache: list, start: int) -> np.ndarray:  # ids: [B, T] -> logits [B, T, V]
        B, T = ids.shape
        D = self.head_dim
        x = self.embed.rows(ids)  # [B, T, C]
        cos, sin = self._rotary(start, T)
        causal = np.arange(start + T)[None, :] <= (start + np.arange(T))[:, None]  # [T, S]
        for block, (k_cache, v_cache) in zip(self.blocks, cache):
            H, KV = block.heads, block.kv_heads
            h = ops.rms_norm(x, block.norm1, self.eps)
            q = ops.rotate(block.q(h).reshape(B, T, H, D).transpose(0, 2, 1, 3), cos, sin)  # [B, H, T, D]
            k = ops.rotate(block.k(h).reshape(B, T, KV, D).transpose(0, 2, 1, 3), cos, sin)  # [B, KV, T, D]
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = block.v(h).reshape(B, T, KV, D).transpose(0, 2, 1, 3)
            keys, values = k_cache[:, :, None, :start + T], v_cache[:, :, None, :start + T]  # [B, KV, 1, S, D]
            # grouped-query attention: query head j reads key/value head j // (H / KV), as transformers' repeat_kv
            att = (q.reshape(B, KV, H // KV, T, D) @ keys.swapaxes(-1, -2)) * self.scaling  # [B, KV, G, T, S]
            att = ops.softmax(np.where(causal, att, np.float32(-np.inf)), -1)
            y = (att @ values).reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
            x = x + block.o(y)
            h = ops.rms_norm(x, block.norm2, self.eps)
            x = x + block.down(ops.ACTIVATIONS["silu"](block.gate(h)) * block.up(h))
        return self.lm_head(ops.rms_norm(x, self.norm, self.eps)).astype(np.float32, copy=False)

    def new_cache(self, batch: int, length: int) -> list:
        return [tuple(np.zeros((batch, b.kv_heads, length, self.head_dim), np.float32) for _ in range(2))
                for b in self.blocks]
