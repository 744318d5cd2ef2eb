"""Expert pruning of mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE: fused experts + a top-k router).

    remove_experts(model, 0.5, calib)       # half the experts of every MoE block, by REAP saliency
    model.save_pretrained("smaller/")       # num_local_experts / num_experts (and top-k if needed) updated

Each expert is scored by REAP (Lasby et al. 2025): the mean over the tokens routed to it of its gate weight
times the norm of its output (an expert no calibration token reaches scores 0 and goes first). Every MoE block
loses the same number of experts, so the config's one expert count describes the result; the router loses the
removed experts' rows, and ``num_experts_per_tok`` is capped at the experts left. With renormalised top-k
weights (Mixtral, ``norm_topk_prob``), removing experts no token is routed to leaves the outputs unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from .width_pruning import count_units, sync_config
from .width_scores import WidthScores, model_parts, width_importance
from .width_surgery import keep_experts

__all__ = ["remove_experts", "expert_saliency"]


def expert_saliency(model: nn.Module, calibration: Any) -> list[torch.Tensor | None]:
    """REAP saliency [experts] of every block's experts (None for blocks with a dense MLP)."""
    return width_importance(model, calibration).experts


@torch.no_grad()
def remove_experts(model: nn.Module, amount: int | float, calibration: Any = None, *,
                   scores: WidthScores | list[torch.Tensor | None] | None = None) -> nn.Module:
    """Remove the least salient experts (a fraction in [0, 1) or a count per MoE block) in place; return the model."""
    _, parts = model_parts(model)
    moe = [i for i, p in enumerate(parts) if p.experts is not None]
    if not moe:
        raise SparsityError("the model has no mixture-of-experts block (fused experts with a router) to prune")
    counts = {parts[i].experts.num_experts for i in moe}
    if len(counts) != 1:
        raise SparsityError(f"the MoE blocks hold different numbers of experts ({sorted(counts)}); expert pruning "
                            "keeps one count for the config")
    total = counts.pop()
    n = count_units(amount, total, "experts per block")
    if scores is None and calibration is None:
        raise SparsityError("expert pruning ranks experts by REAP saliency: pass calibration data (token-id tensors)")
    saliency = scores.experts if isinstance(scores, WidthScores) else scores
    if saliency is None:
        saliency = expert_saliency(model, calibration)
    if len(saliency) != len(parts) or any(saliency[i] is None or len(saliency[i]) != total for i in moe):
        raise SparsityError("scores do not match the model's MoE blocks; compute them with width_importance(model, "
                            "calibration) on this model")
    removed = {}
    for i in moe:
        order = torch.argsort(saliency[i], stable=True)
        removed[i] = order[:n].sort().values.tolist()
        if n:
            keep_experts(parts[i], order[n:].sort().values)
    sync_config(model)
    history = list(getattr(model, "sparsetorch_width_removed", []))
    model.sparsetorch_width_removed = history + [{"kind": "experts", "removed": removed}]
    return model
