"""Decoder-only transformer stacks with a KV cache, in numpy: the shared decoding loop (:class:`Decoder`) and
sparsetorch's byte GPT (pre-LN: causal self-attention + GELU MLP, learned positions); Llama is in llama.py.

The file's "gpt" node names its tensors by the exported module's parameter names (``blocks.0.attn.qkv.weight``...).
Its ``heads`` is one count for every block, or (format version 2, models shrunk by ``sparsetorch.shrink``) a list
with one count per block; each block's head size is its qkv width / 3 / heads, so blocks may differ in heads, head
size and MLP width, and the hidden size need not equal heads x head size.
"""
from __future__ import annotations

import numpy as np

from ..errors import SparsityError
from . import ops


class _Block:
    def __init__(self, model, prefix: str, heads: int):
        self.ln1 = (model.array(f"{prefix}ln1.weight"), model.array(f"{prefix}ln1.bias"))
        self.ln2 = (model.array(f"{prefix}ln2.weight"), model.array(f"{prefix}ln2.bias"))
        self.qkv = model.linear(f"{prefix}attn.qkv.weight", f"{prefix}attn.qkv.bias")
        self.proj = model.linear(f"{prefix}attn.proj.weight", f"{prefix}attn.proj.bias")
        self.fc = model.linear(f"{prefix}mlp.fc.weight", f"{prefix}mlp.fc.bias")
        self.fc_proj = model.linear(f"{prefix}mlp.proj.weight", f"{prefix}mlp.proj.bias")
        self.heads, inner = heads, self.qkv.out_features // 3
        if heads < 1 or self.qkv.out_features != 3 * inner or inner % heads or self.proj.in_features != inner:
            raise SparsityError(f"{prefix}attn: {heads} heads do not split qkv width {self.qkv.out_features} into "
                                f"q, k, v heads read by proj's {self.proj.in_features} inputs; the file is corrupted")
        self.head_dim = inner // heads


class Decoder:
    """Token ids -> logits; ``forward`` runs whole sequences, ``generate`` decodes one token at a time.

    Subclasses set ``context``, ``vocab``, ``eos`` (token ids that end generation) and ``slides`` (True: past the
    context the window slides and is recomputed, as the torch GPT crops; False: the positions end there), and
    implement ``step`` and ``new_cache``."""

    context: int
    vocab: int
    eos: frozenset = frozenset()
    slides = True

    def step(self, ids: np.ndarray, cache: list, start: int) -> np.ndarray:  # ids: [B, T] -> logits [B, T, V]
        raise NotImplementedError

    def new_cache(self, batch: int, length: int) -> list:
        raise NotImplementedError

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
        if not self.slides and len(tokens) + n - 1 > self.context:
            raise SparsityError(f"a prompt of {len(tokens)} tokens plus {n} new ones runs past the model's "
                                f"{self.context} positions (max_position_embeddings); ask for fewer tokens",
                                context=self.context)
        rng = np.random.default_rng(seed)
        window = tokens[-self.context:]
        ids = np.asarray([window], np.int64)
        self._check(ids)
        cache = self.new_cache(1, min(self.context, len(window) + n))
        logits = self.step(ids, cache, 0)[0, -1]
        length = len(window)
        for i in range(n):
            nxt = self._pick(logits, temperature, top_k, rng)
            tokens.append(nxt)
            if i == n - 1 or nxt in self.eos:
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


class Transformer(Decoder):
    """sparsetorch's byte GPT."""

    def __init__(self, model, node: dict):
        p = node["prefix"]
        self.context, self.vocab, self.width = node["context"], node["vocab"], node["width"]
        heads = node["heads"] if isinstance(node["heads"], list) else [node["heads"]] * node["layers"]
        if len(heads) != node["layers"] or not all(isinstance(h, int) for h in heads):
            raise SparsityError(f"the gpt node lists heads {heads} for {node['layers']} blocks; the file is corrupted")
        self.eps = float(node["eps"])
        self.tok = model.matrix(f"{p}tok.weight")  # [V, C] embedding tables: rows are looked up, not multiplied
        self.pos = model.matrix(f"{p}pos.weight")  # [context, C]
        if self.tok.shape != (self.vocab, self.width) or self.pos.shape != (self.context, self.width):
            raise SparsityError(f"the gpt node's vocabulary {self.vocab}, context {self.context} and width {self.width} "
                                f"do not match its embeddings {list(self.tok.shape)}, {list(self.pos.shape)}; the file "
                                "is corrupted")
        self.blocks = [_Block(model, f"{p}blocks.{i}.", h) for i, h in enumerate(heads)]
        self.ln_f = (model.array(f"{p}ln_f.weight"), model.array(f"{p}ln_f.bias"))
        self.lm_head = model.linear(f"{p}lm_head.weight", node.get("lm_head_bias"))

    # -- one pass over new tokens, appending their keys/values to the cache ---------------------------------
    def step(self, ids: np.ndarray, cache: list, start: int) -> np.ndarray:  # ids: [B, T] -> logits [B, T, V]
        B, T = ids.shape
        x = self.tok.rows(ids) + self.pos.rows(np.arange(start, start + T))  # [B, T, C]
        # query i (absolute position start+i) sees keys 0..start+i
        causal = np.arange(start + T)[None, :] <= (start + np.arange(T))[:, None]  # [T, S]
        for block, (k_cache, v_cache) in zip(self.blocks, cache):
            H, D = block.heads, block.head_dim
            h = ops.layer_norm(x, 1, *block.ln1, self.eps)
            q, k, v = np.split(block.qkv(h), 3, axis=-1)  # 3 x [B, T, H*D]
            q, k, v = (t.reshape(B, T, H, D).transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, D]
            k_cache[:, :, start:start + T], v_cache[:, :, start:start + T] = k, v
            keys, values = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # [B, H, S, D]
            att = (q @ keys.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(D))  # [B, H, T, S]
            att = ops.softmax(np.where(causal, att, np.float32(-np.inf)), -1)
            y = (att @ values).transpose(0, 2, 1, 3).reshape(B, T, H * D)
            x = x + block.proj(y)
            x = x + block.fc_proj(ops.gelu(block.fc(ops.layer_norm(x, 1, *block.ln2, self.eps))))
        return self.lm_head(ops.layer_norm(x, 1, *self.ln_f, self.eps)).astype(np.float32, copy=False)

    def new_cache(self, batch: int, length: int) -> list:
        return [tuple(np.zeros((batch, b.heads, length, b.head_dim), np.float32) for _ in range(2)) for b in self.blocks]
