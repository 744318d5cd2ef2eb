"""A decoder-only transformer stack (pre-LN GPT: causal self-attention + GELU MLP) with a KV cache, in numpy.

The file's "gpt" node names its tensors by the exported module's parameter names (``blocks.0.attn.qkv.weight``...).
"""
from __future__ import annotations

import numpy as np

from ..errors import SparsityError
from . import ops


class _Block:
    def __init__(self, model, prefix: str):
        self.ln1 = (model.array(f"{prefix}ln1.weight"), model.array(f"{prefix}ln1.bias"))
        self.ln2 = (model.array(f"{prefix}ln2.weight"), model.array(f"{prefix}ln2.bias"))
        self.qkv = model.linear(f"{prefix}attn.qkv.weight", f"{prefix}attn.qkv.bias")
        self.proj = model.linear(f"{prefix}attn.proj.weight", f"{prefix}attn.proj.bias")
        self.fc = model.linear(f"{prefix}mlp.fc.weight", f"{prefix}mlp.fc.bias")
        self.fc_proj = model.linear(f"{prefix}mlp.proj.weight", f"{prefix}mlp.proj.bias")


class Transformer:
    """Token ids -> logits; ``forward`` runs whole sequences, ``generate`` decodes one token at a time."""

    def __init__(self, model, node: dict):
        p = node["prefix"]
        self.heads, self.context, self.vocab, self.width = node["heads"], node["context"], node["vocab"], node["width"]
        self.eps = float(node["eps"])
        self.tok = model.matrix(f"{p}tok.weight").to_dense()  # [V, C] embedding tables are looked up, not multiplied
        self.pos = model.matrix(f"{p}pos.weight").to_dense()  # [context, C]
        self.blocks = [_Block(model, f"{p}blocks.{i}.") for i in range(node["layers"])]
        self.ln_f = (model.array(f"{p}ln_f.weight"), model.array(f"{p}ln_f.bias"))
        self.lm_head = model.linear(f"{p}lm_head.weight", node.get("lm_head_bias"))

    # -- one pass over new tokens, appending their keys/values to the cache ---------------------------------
    def step(self, ids: np.ndarray, cache: list, start: int) -> np.ndarray:  # ids: [B, T] -> logits [B, T, V]
        B, T = ids.shape
        C, H = self.width, self.heads
        D = C // H
        x = self.tok[ids] + self.pos[start:start + T]  # [B, T, C]
        # query i (absolute position start+i) sees keys 0..start+i
        causal = np.arange(start + T)[None, :] <= (start + np.arange(T))[:, None]  # [T, S]
        for block, (k_cache, v_cache) in zip(self.blocks, cache):
            h = ops.layer_norm(x, 1, *block.ln1, self.eps)
            q, k, v = np.split(block.qkv(h), 3, axis=-1)  # 3 x [B, T, C]
            q, k, v = (t.reshape(B, T, H, D).transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
            k_cache[:, :, start:start + T], v_cache[:, :, start:start + T] = k, v
            keys, values = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # [B, H, S, D]
            att = (q @ keys.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(D))  # [B, H, T, S]
            att = ops.softmax(np.where(causal, att, np.float32(-np.inf)), -1)
            y = (att @ values).transpose(0, 2, 1, 3).reshape(B, T, C)
            x = x + block.proj(y)
            x = x + block.fc_proj(ops.gelu(block.fc(ops.layer_norm(x, 1, *block.ln2, self.eps))))
        return self.lm_head(ops.layer_norm(x, 1, *self.ln_f, self.eps)).astype(np.float32, copy=False)

    def new_cache(self, batch: int, length: int) -> list:
        shape = (batch, self.heads, length, self.width // self.heads)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in self.blocks]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        self._check(ids)
        return self.step(ids, self.new_cache(ids.shape[0], ids.shape[1]), 0)

    def _check(self, ids: np.ndarray) -> None:
        if ids.shape[1] > self.context or ids.shape[1] == 0:
            raise SparsityError(f"sequence length {ids.shape[1]} is outside the model's context 1..{self.context}",
                                length=int(ids.shape[1]))
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise SparsityError(f"token ids must lie in [0, {self.vocab}), got {int(ids.min())}..{int(ids.max())}")

    def generate(self, prompt, n: int, *, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None):
        as_bytes = isinstance(prompt, (bytes, bytearray))
        tokens = [int(t) for t in (prompt if not isinstance(prompt, np.ndarray) else prompt.reshape(-1))]
        if not tokens:
            raise SparsityError("generate() needs a prompt of at least one token")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise SparsityError(f"temperature must be >= 0 and top_k >= 1, got {temperature}, {top_k}")
        rng = np.random.default_rng(seed)
        window = tokens[-self.context:]
        ids = np.asarray([window], np.int64)
        self._check(ids)
        cache = self.new_cache(1, self.context)
        logits = self.step(ids, cache, 0)[0, -1]
        length = len(window)
        for i in range(n):
            nxt = self._pick(logits, temperature, top_k, rng)
            tokens.append(nxt)
            if i == n - 1:
                break
            if length < self.context:  # the cached keys stay valid: feed only the new token
                logits = self.step(np.asarray([[nxt]], np.int64), cache, length)[0, -1]
                length += 1
            else:  # the window slides and every position shifts: recompute it (as torch does when cropping)
                logits = self.step(np.asarray([tokens[-self.context:]], np.int64), cache, 0)[0, -1]
        return bytes(tokens) if as_bytes and self.vocab <= 256 else tokens

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
        if temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        if top_k is not None and top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        return int(rng.choice(z.size, p=p / p.sum()))

