"""Activation-based importance of heads, MLP neurons, hidden channels and experts, from one calibration pass.

Minitron (Muralidharan et al. 2024, "Compact language models via pruning and knowledge distillation") scores
each unit by the size of its activations on calibration tokens: a head by its attention output (the input of
the output projection, one head_dim slice per head), an MLP neuron by its intermediate activation (the input of
the down projection), a hidden channel by the outputs of every LayerNorm/RMSNorm over it, summed. ``metric``
"l2" is the root mean square over tokens (times sqrt(head_dim) for a head: the L2 norm of its output vector),
"mean" the mean absolute value. Experts are scored by REAP (Lasby et al. 2025, "REAP the experts"): the mean,
over the tokens routed to an expert, of its gate weight times the norm of its output.

The signed mean of every output-projection input is kept too: FLAP (An et al. 2024) adds the mean contribution
of removed channels into the projection's bias.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from ..oneshot.blocks import find_blocks
from ..oneshot.calibration import prepare_calibration
from .width_surgery import BlockParts, block_parts, hidden_norms

__all__ = ["WidthScores", "width_importance", "model_parts", "METRICS", "unit_score", "reap_saliency"]

METRICS = ("l2", "mean")


@dataclass
class WidthScores:
    """Per block: ``heads`` [query heads], ``mlp`` [neurons] (None for MoE blocks), ``experts`` [experts] (None
    for dense MLPs), and the signed means of the out projections' inputs (``head_means`` [heads * head_dim],
    ``mlp_means``); for the model: ``hidden`` [hidden size]. Higher = keep."""

    metric: str
    heads: list[torch.Tensor]
    head_means: list[torch.Tensor]
    mlp: list[torch.Tensor | None]
    mlp_means: list[torch.Tensor | None]
    experts: list[torch.Tensor | None]
    hidden: torch.Tensor
    tokens: int


def unit_score(sum_abs: torch.Tensor, sum_sq: torch.Tensor, count: int, metric: str) -> torch.Tensor:
    """Per channel: mean |a| ("mean") or sqrt(mean a^2) ("l2") over ``count`` tokens."""
    n = max(count, 1)
    return sum_abs / n if metric == "mean" else (sum_sq / n).sqrt()


def reap_saliency(gate: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """REAP's per-token term for one expert: gate weight [n] times the L2 norm of its output [n, H]; sum -> [1]."""
    return (gate.float() * output.float().norm(dim=-1)).sum()


class _Channels:
    """Running sums over tokens of |a|, a^2 and a for the last dimension of a tensor."""

    def __init__(self) -> None:
        self.abs = self.sq = self.sum = None
        self.count = 0

    def add(self, x: torch.Tensor, tokens: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if tokens is not None:
            x = x[tokens.reshape(-1).to(x.device)]
        parts = (x.abs().sum(0), x.square().sum(0), x.sum(0))
        if self.abs is None:
            self.abs, self.sq, self.sum = (p.cpu() for p in parts)
        else:
            self.abs += parts[0].cpu()
            self.sq += parts[1].cpu()
            self.sum += parts[2].cpu()
        self.count += x.shape[0]

    def score(self, metric: str, group: int = 1) -> torch.Tensor:
        if self.abs is None:
            raise SparsityError("a scored layer saw no calibration tokens; check that the calibration data reaches "
                                "every block (an all-padding batch?)")
        if metric == "mean":
            return (self.abs / max(self.count, 1)).reshape(-1, group).mean(1)
        return (self.sq / max(self.count, 1)).reshape(-1, group).sum(1).sqrt()

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def model_parts(model: nn.Module) -> tuple[nn.ModuleList, list[BlockParts]]:
    """The decoder blocks of a transformers causal LM and their recognised parts (raises if not understood)."""
    found = find_blocks(model)
    if found is None or not callable(getattr(model, "get_input_embeddings", None)):
        raise SparsityError(f"{type(model).__name__} is not a transformers decoder with a stack of blocks; width "
                            "pruning supports Llama / Mistral / Qwen2 / Qwen3, their MoE variants, GPT-2 and "
                            "sparsetorch.models.gpt.GPT")
    name, blocks = found
    return blocks, [block_parts(b, f"{name}.{i}") for i, b in enumerate(blocks)]


@torch.no_grad()
def width_importance(model: nn.Module, calibration: Any, metric: str = "l2") -> WidthScores:
    """Score every head, MLP neuron, hidden channel and expert of ``model`` on ``calibration`` (token-id tensors
    or dicts with ``input_ids`` / ``attention_mask``; padding is left out). See the module docstring."""
    if metric not in METRICS:
        raise SparsityError(f"metric must be one of {METRICS}, got {metric!r}", metric=metric)
    blocks, parts = model_parts(model)
    norms = hidden_norms(model, blocks)
    calib = prepare_calibration(model, calibration)
    heads = [_Channels() for _ in parts]
    mlps = [_Channels() if p.mlp_out is not None else None for p in parts]
    norm_acc = [_Channels() for _ in norms]
    reap = [torch.zeros(p.experts.num_experts, dtype=torch.float64) if p.experts else None for p in parts]
    routed = [torch.zeros(p.experts.num_experts, dtype=torch.float64) if p.experts else None for p in parts]
    current: list[torch.Tensor | None] = [None]
    handles = []

    def pre(acc):
        return lambda _m, args: acc.add(args[0], current[0])

    try:
        for i, p in enumerate(parts):
            handles.append(p.out_proj.register_forward_pre_hook(pre(heads[i])))
            if mlps[i] is not None:
                handles.append(p.mlp_out.register_forward_pre_hook(pre(mlps[i])))
            if p.experts is not None:
                handles.append(p.experts.module.register_forward_pre_hook(
                    _reap_hook(p, reap[i], routed[i], current), with_kwargs=True))
        for norm, acc in zip(norms, norm_acc):
            handles.append(norm.register_forward_hook(lambda _m, _a, out, acc=acc: acc.add(out, current[0])))
        was = model.training
        model.eval()
        try:
            for sample, mask in zip(calib.samples, calib.token_masks):
                current[0] = mask
                calib.run(sample)
        finally:
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return WidthScores(
        metric=metric,
        heads=[h.score(metric, p.head_dim) for h, p in zip(heads, parts)],
        head_means=[h.mean() for h in heads],
        mlp=[m.score(metric) if m is not None else None for m in mlps],
        mlp_means=[m.mean() if m is not None else None for m in mlps],
        experts=[(r / c.clamp_min(1)).float() if r is not None else None for r, c in zip(reap, routed)],
        hidden=torch.stack([a.score(metric) for a in norm_acc]).sum(0),
        tokens=heads[0].count,
    )


def _reap_hook(parts: BlockParts, total: torch.Tensor, routed: torch.Tensor, current: list):
    layout = parts.experts
    sig = inspect.signature(layout.module.forward)
    names = [n for n in sig.parameters][:3]

    def hook(_m, args, kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        x, index, weights = (bound.get(n) for n in names)
        x = x.reshape(-1, x.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        real = current[0].reshape(-1).to(x.device) if current[0] is not None else None
        for e in range(layout.num_experts):
            hit = index == e  # [tokens, k]
            if real is not None:
                hit &= real[:, None]
            rows = hit.any(-1)
            if not bool(rows.any()):
                continue
            xe = x[rows]
            out = layout.linear(layout.down_input(xe, e), layout.down, e)
            gate = (weights * hit).sum(-1)[rows]
            total[e] += float(reap_saliency(gate, out))
            routed[e] += int(rows.sum())

    return hook
