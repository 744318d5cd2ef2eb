"""Depth pruning: score every block of a transformer on calibration data, then remove whole blocks.

    scores = block_importance(model, calibration)                 # ShortGPT's Block Influence per block
    remove_blocks(model, 0.25, calibration)                      # drop the quarter of blocks that matter least
    model.save_pretrained("smaller/")                            # a plain transformers model, fewer layers

Two scores: ``"cosine"`` (Men et al. 2024, ShortGPT: BI_i = 1 - E_tokens cos(x_in, x_out), one forward pass)
and ``"loss"`` (the rise of the mean next-token loss when the block alone is skipped, one pass per block).
The model keeps its class: the block list shrinks, every attention's ``layer_idx`` (the KV-cache slot) is
renumbered, and the config's layer count and per-layer lists follow, so ``from_pretrained`` loads the result.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsityError
from ..oneshot.blocks import find_blocks
from ..oneshot.calibration import prepare_calibration

METRICS = ("cosine", "loss")
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list")  # one entry per layer
_INDEX_KEYS = ("mlp_only_layers",)  # lists of layer indices

__all__ = ["block_importance", "remove_blocks", "block_influence", "METRICS"]


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, tokens: torch.Tensor | None) -> tuple[float, int]:
    """ShortGPT's Block Influence summed over tokens: (sum of 1 - cos(x_in, x_out), token count).

    x_in, x_out: [B, T, C] hidden states entering and leaving a block; tokens: [B, T] bool or None (all)."""
    cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
    if tokens is not None:
        cos = cos[tokens.to(cos.device).reshape(cos.shape)]
    return float((1 - cos).sum()), cos.numel()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = find_blocks(model)
    if found is None:
        raise SparsityError(f"no stack of repeated blocks found in {type(model).__name__}; depth pruning needs a "
                            "transformer (a ModuleList of identical blocks)")
    return found


@torch.no_grad()
def block_importance(model: nn.Module, calibration: Any, metric: str = "cosine") -> torch.Tensor:
    """Importance of each block [n_blocks] (higher = keep): ``metric`` "cosine" or "loss" (see module docstring).

    ``calibration``: token-id tensors or dicts with ``input_ids`` / ``attention_mask`` (padding is ignored)."""
    if metric not in METRICS:
        raise SparsityError(f"metric must be one of {METRICS}, got {metric!r}", metric=metric)
    _, blocks = _blocks(model)
    calib = prepare_calibration(model, calibration)
    was = model.training
    model.eval()
    try:
        return _cosine(blocks, calib) if metric == "cosine" else _loss_rise(model, blocks, calib)
    finally:
        model.train(was)


def _cosine(blocks: nn.ModuleList, calib) -> torch.Tensor:
    sums, counts = [0.0] * len(blocks), [0] * len(blocks)
    inputs: dict[int, torch.Tensor] = {}
    current: list[torch.Tensor | None] = [None]

    def pre(i):
        def hook(_m, args, kwargs):
            inputs[i] = _hidden(args, kwargs)
        return hook

    def post(i):
        def hook(_m, _args, _kwargs, out):
            s, c = block_influence(inputs.pop(i), _first(out), current[0])
            sums[i] += s
            counts[i] += c
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for sample, mask in zip(calib.samples, calib.token_masks):
            current[0] = mask
            calib.run(sample)
    finally:
        for h in handles:
            h.remove()
    return torch.tensor([s / max(c, 1) for s, c in zip(sums, counts)])


def _mean_loss(calib) -> float:
    """Mean next-token cross-entropy over the calibration tokens (padding excluded)."""
    total, count = 0.0, 0
    for sample, mask in zip(calib.samples, calib.token_masks):
        ids = sample["input_ids"] if isinstance(sample, dict) else sample
        out = calib.run(sample)
        logits = getattr(out, "logits", out)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or not isinstance(logits, torch.Tensor) \
                or logits.dim() != 3:
            raise SparsityError("the loss metric needs a causal LM fed token ids (logits [batch, tokens, vocab]); "
                                "use metric='cosine' for other models")
        ids = ids.reshape(logits.shape[:2]).to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        keep = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask[:, 1:].flatten().to(nll.device)
        total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    return total / max(count, 1)


def _loss_rise(model: nn.Module, blocks: nn.ModuleList, calib) -> torch.Tensor:
    base = _mean_loss(calib)
    rises = []
    for block in blocks:
        def skip(_m, args, kwargs, out):  # the block passes its input through unchanged
            x = _hidden(args, kwargs)
            return (x, *out[1:]) if isinstance(out, tuple) else x
        handle = block.register_forward_hook(skip, with_kwargs=True)
        try:
            rises.append(_mean_loss(calib) - base)
        finally:
            handle.remove()
    return torch.tensor(rises)


def _choose(n_blocks: int, blocks: int | float | Sequence[int], scores: torch.Tensor | None) -> list[int]:
    """The indices to remove: ``blocks`` given explicitly, or the lowest-scoring int / fraction of them."""
    if isinstance(blocks, (list, tuple, range)):
        chosen = sorted(set(int(b) for b in blocks))
        if any(b < 0 or b >= n_blocks for b in chosen):
            raise SparsityError(f"block indices must lie in [0, {n_blocks}), got {list(blocks)}")
    else:
        if isinstance(blocks, bool) or not isinstance(blocks, (int, float)):
            raise SparsityError(f"blocks must be a count, a fraction in [0, 1) or a list of indices, got {blocks!r}")
        if isinstance(blocks, float):
            if not 0.0 <= blocks < 1.0:
                raise SparsityError(f"a fraction of blocks must lie in [0, 1), got {blocks}")
            blocks = round(blocks * n_blocks)
        if scores is None:
            raise SparsityError("choosing blocks by score needs calibration data (or pass the indices to remove)")
        chosen = sorted(torch.argsort(scores, stable=True)[:blocks].tolist())
    if len(chosen) >= n_blocks:
        raise SparsityError(f"cannot remove {len(chosen)} of {n_blocks} blocks: at least one must stay")
    return chosen


def _update_config(model: nn.Module, keep: list[int], old_n: int) -> None:
    config = getattr(model, "config", None)
    cfg = getattr(model, "cfg", None)
    if config is None and dataclasses.is_dataclass(cfg) and getattr(cfg, "layers", None) == old_n:
        model.cfg = dataclasses.replace(cfg, layers=len(keep))  # sparsetorch's own GPT
        return
    if config is None:
        return
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise SparsityError("this GPT-2 scales attention by 1/layer_idx, so a block's output depends on its position "
                            "and removing blocks would change the rest; depth pruning does not apply")
    for key in _COUNT_KEYS:
        if getattr(config, key, None) == old_n:
            setattr(config, key, len(keep))
    for key in _PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == old_n:
            setattr(config, key, [value[i] for i in keep])
    where = {old: new for new, old in enumerate(keep)}
    for key in _INDEX_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            setattr(config, key, [where[i] for i in value if i in where])


@torch.no_grad()
def remove_blocks(model: nn.Module, blocks: int | float | Sequence[int], calibration: Any = None,
                  metric: str = "cosine") -> nn.Module:
    """Remove whole blocks from ``model`` in place and return it.

    ``blocks``: how many (int) or what fraction (float in [0, 1)) of the lowest-importance blocks to remove,
    scored by :func:`block_importance` on ``calibration`` with ``metric``; or the indices to remove (a list).
    ``model.sparsetorch_removed_blocks`` records the removed indices and the scores."""
    _, stack = _blocks(model)
    n = len(stack)
    explicit = isinstance(blocks, (list, tuple, range))
    scores = None if explicit else block_importance(model, calibration, metric) if calibration is not None else None
    removed = _choose(n, blocks, scores)
    keep = [i for i in range(n) if i not in set(removed)]
    _update_config(model, keep, n)
    kept = [stack[i] for i in keep]
    for new, block in enumerate(kept):
        for module in block.modules():  # the KV-cache slot of each attention; the decoder's own index if any
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for i in range(n - 1, -1, -1):
        del stack[i]
    stack.extend(kept)
    model.sparsetorch_removed_blocks = {"removed": removed, "scores": None if scores is None else scores.tolist(),
                                        "metric": None if explicit else metric}
    return model
