"""A small byte-level GPT (nanoGPT-style pre-LN decoder) defined in code, for one-shot pruning demos
and benchmarks. Tokens are bytes (vocabulary 256); the lm_head is a separate Linear."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 4
    width: int = 128
    heads: int = 4
    context: int = 128
    vocab: int = 256


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // (3 * self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        B, T, _ = x.shape
        # heads * head_dim is the width C until heads or hidden channels are removed (sparsetorch.shrink)
        inner = self.qkv.out_features // 3
        q, k, v = self.qkv(x).split(inner, dim=2)  # 3 x [B, T, H*D]
        q, k, v = (t.view(B, T, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        return self.proj(y.transpose(1, 2).reshape(B, T, inner))


class MLPBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.width), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.width), MLPBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``GPT(GPTConfig())(ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the transformers convention; one-shot pruning validates token ids with it)."""
        return self.tok

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (the transformers convention; hidden-size pruning slices it with the embeddings)."""
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, T] int
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, vocab]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats/byte) of ``ids [B, T+1]``."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
