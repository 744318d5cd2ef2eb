"""Width pruning of transformers decoders: attention heads (GQA-aware), MLP neurons and the hidden size.

    remove_heads(model, 0.25, calib)                   # a quarter of the key/value groups (with their query heads)
    remove_heads(model, 0.5, calib, unit="query")      # half the query heads of every group; K/V heads all stay
    remove_mlp_channels(model, 0.25, calib, compensate=True)   # FLAP bias compensation
    remove_hidden(model, 0.25, calib)                  # embedding channels, through every norm, projection and head
    sparsetorch.shrink.save_pretrained(model, "small/")  # loads with plain transformers when the config says it all

Units are scored by their activations on ``calibration`` (:func:`width_importance`, Minitron's criterion) and the
lowest go. By default every block loses the same number (``per_layer=False``): the widths stay uniform, the
config is updated, and for Llama / Mistral / Qwen2 / Qwen3 (and their MoE variants) ``save_pretrained`` output
loads with ``transformers.AutoModelForCausalLM.from_pretrained`` alone. ``per_layer=True`` ranks units across
blocks (scores divided by their block's mean, every block keeping one unit), so blocks end with different
widths: the config keeps the original sizes and :func:`sparsetorch.shrink.save_pretrained` records every
changed shape for :func:`sparsetorch.shrink.from_pretrained`. GPT-2's config ties head size to ``n_embd /
n_head``, so GPT-2 heads and hidden size also need that loader; GPT-2 MLP width does not. sparsetorch's byte GPT
(``sparsetorch.models.gpt.GPT``) takes every cut; its shapes are saved with ``save_shrunk`` and it exports to ONNX
and the edge runtime with per-block widths.

GQA: ``unit="group"`` removes whole key/value groups (each with its query heads); ``unit="query"`` removes the
same number of query heads from every group, so that one ``num_attention_heads`` / ``num_key_value_heads`` pair
describes the result. A request no config can express raises ``SparsityError`` saying which amounts work.

``compensate=True`` (FLAP, An et al. 2024): the mean contribution of the removed heads / neurons over the
calibration tokens is added to the output projection's bias, so the block's mean output is unchanged. A
Llama-style model without that bias gets one: the config's ``attention_bias`` / ``mlp_bias`` is switched on and
the other projections get zero biases, so the result still loads with transformers; an architecture whose
config cannot declare the bias (Qwen2's o_proj, Mistral) raises instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from .groups import adapter_for
from .width_scores import WidthScores, model_parts, width_importance
from .width_surgery import BlockParts, hidden_norms, keep_heads, keep_hidden, keep_mlp

__all__ = ["remove_heads", "remove_mlp_channels", "remove_hidden", "sync_config", "count_units", "allocate"]

UNITS = ("group", "query")


def count_units(amount: int | float, total: int, what: str, *, exact: bool = False, hint: str = "") -> int:
    """How many of ``total`` units ``amount`` (a count, or a fraction in [0, 1)) removes; at least one stays.
    ``exact``: a fraction must give a whole number of units (GQA groups)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise SparsityError(f"the amount of {what} to remove must be a count or a fraction in [0, 1), got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount < 1.0:
            raise SparsityError(f"a fraction of {what} must lie in [0, 1), got {amount}; pass e.g. 0.25 to remove a "
                                "quarter", amount=amount)
        n = amount * total
        if exact and abs(n - round(n)) > 1e-6:
            allowed = ", ".join(f"{k / total:g}" for k in range(1, total))
            raise SparsityError(f"{amount} of {total} {what} is {n:g}, not a whole number; {hint}use one of the "
                                f"fractions {allowed or '(none: there is only one)'} or a count", amount=amount)
        n = round(n)
    else:
        n = amount
    if n < 0:
        raise SparsityError(f"cannot remove a negative number of {what} ({n})")
    if n >= total:
        raise SparsityError(f"cannot remove {n} of {total} {what}: at least one must stay; {hint}pass fewer",
                            amount=amount)
    return int(n)


def allocate(scores: list[torch.Tensor], total: int) -> list[int]:
    """Per-block counts removing the ``total`` lowest units across blocks (each block's scores divided by its
    mean, so that blocks with larger activations do not keep everything); every block keeps one unit."""
    entries = []
    for i, s in enumerate(scores):
        s = s.float() / s.float().mean().clamp_min(1e-30)
        entries += [(float(v), i) for v in torch.sort(s).values[:-1]]
    if total > len(entries):
        raise SparsityError(f"cannot remove {total} units: every block must keep at least one")
    entries.sort(key=lambda e: e[0])
    counts = [0] * len(scores)
    for _, i in entries[:total]:
        counts[i] += 1
    return counts


def _scores(model, calibration, scores: WidthScores | None, metric: str) -> WidthScores:
    if scores is not None:
        _, parts = model_parts(model)
        fits = isinstance(scores, WidthScores) and len(scores.heads) == len(parts) and all(
            h.numel() == p.num_heads and (m is None or p.mlp_out is None or m.numel() == p.mlp_width)
            for h, m, p in zip(scores.heads, scores.mlp, parts)) and scores.hidden.numel() == \
            model.get_input_embeddings().weight.shape[1]
        if not fits:
            raise SparsityError("scores do not match the model's current widths; compute them with "
                                "width_importance(model, calibration) after the last change")
        return scores
    if calibration is None:
        raise SparsityError("width pruning ranks units by their activations: pass calibration data (token-id "
                            "tensors), or scores=width_importance(model, calibration)")
    return width_importance(model, calibration, metric)


def _record(model: nn.Module, entry: dict) -> None:
    history = list(getattr(model, "sparsetorch_width_removed", []))
    model.sparsetorch_width_removed = history + [entry]


# -- heads -----------------------------------------------------------------------------------------------
def _head_plan(p: BlockParts, head_scores: torch.Tensor, unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Removal order of a block's units: (unit scores ascending, for each unit in that order the query heads it
    removes). A query "unit" is a slot: the r-th weakest query head of every group."""
    nkv = p.num_kv_heads
    rep = p.num_heads // nkv
    per_group = head_scores.reshape(nkv, rep)
    if unit == "group":
        order = torch.argsort(per_group.sum(1), stable=True)
        heads = [torch.arange(g * rep, (g + 1) * rep) for g in order.tolist()]
        return per_group.sum(1)[order], torch.stack(heads)
    sorted_scores, idx = torch.sort(per_group, dim=1, stable=True)  # [nkv, rep]
    heads = idx + torch.arange(nkv)[:, None] * rep
    return sorted_scores.sum(0), heads.t()  # slot r removes heads[:, r] of every group


def _ensure_bias(model: nn.Module, parts: list[BlockParts], which: str) -> None:
    """Give every output projection of ``which`` ("attn" / "mlp") a bias, declared in the config, or raise."""
    outs = [p.out_proj if which == "attn" else p.mlp_out for p in parts]
    outs = [o for o in outs if o is not None]
    if all(getattr(o, "bias", None) is not None for o in outs):
        return
    flag = "attention_bias" if which == "attn" else "mlp_bias"
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, flag, None), bool):
        layer = type(outs[0]).__name__
        raise SparsityError(f"compensate=True adds the removed units' mean output to the output projection's bias, "
                            f"but this model's {which} output projection ({layer}) has none and its config has no "
                            f"{flag!r} to declare one; pass compensate=False", flag=flag)
    setattr(config, flag, True)
    for p in parts:
        mods = (p.attn.q_proj, p.attn.k_proj, p.attn.v_proj, p.attn.o_proj) if which == "attn" else \
            (p.mlp.gate_proj, p.mlp.up_proj, p.mlp.down_proj) if p.mlp_kind == "gated" else ()
        for m in mods:
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))


def _compensate(module: nn.Module, idx: torch.Tensor, means: torch.Tensor) -> None:
    """FLAP: the removed inputs' mean values [len(idx)] times their weights go into the bias."""
    w = module.weight
    adapter_for(module).fold(module, idx.to(w.device), means[idx].to(w.device, torch.float32))


@torch.no_grad()
def remove_heads(model: nn.Module, amount: int | float, calibration: Any = None, *, unit: str = "group",
                 per_layer: bool = False, compensate: bool = False, metric: str = "l2",
                 scores: WidthScores | None = None) -> nn.Module:
    """Remove attention heads from every block of ``model`` in place and return it.

    ``amount``: a fraction in [0, 1) of the units, or a count per block. ``unit="group"``: key/value groups
    (each with its query heads; for GPT-2 and other multi-head attention, a group is one head);
    ``unit="query"``: query heads, the same number from every group (a fraction must be a multiple of 1/group
    size, a count a multiple of the number of groups). ``per_layer``, ``compensate``: see the module docstring.
    """
    if unit not in UNITS:
        raise SparsityError(f"unit must be one of {UNITS}, got {unit!r}", unit=unit)
    _, parts = model_parts(model)
    nh, nkv = parts[0].num_heads, parts[0].num_kv_heads
    rep = nh // nkv
    uniform = len({(p.num_heads, p.num_kv_heads) for p in parts}) == 1
    if unit == "query" and rep == 1:
        raise SparsityError("unit='query' removes query heads within key/value groups, but every group here holds one "
                            "query head (multi-head attention); use unit='group' to remove whole heads")
    if not per_layer and not uniform:
        raise SparsityError("the blocks have different head counts already; pass per_layer=True")
    if unit == "group" and nkv == 1 and amount:
        raise SparsityError("the attention has one key/value group (multi-query attention): removing a group removes "
                            "every head; use unit='query' to remove query heads", amount=amount)
    if unit == "group":
        n = count_units(amount, nkv, "key/value groups per block", exact=True,
                        hint="whole groups go (with their query heads): ")
    else:
        n_q = count_units(amount, nh, "query heads per block", exact=True,
                          hint=f"every one of the {nkv} key/value groups must lose as many query heads: ")
        if n_q % nkv:
            raise SparsityError(f"removing {n_q} query heads does not split evenly over {nkv} key/value groups; every "
                                f"group must lose as many query heads so that the config can describe the result: "
                                f"remove a multiple of {nkv} (fractions {', '.join(f'{k / rep:g}' for k in range(1, rep))})"
                                ", or use unit='group'", amount=amount)
        n = n_q // nkv
    s = _scores(model, calibration, scores, metric)
    plans = [_head_plan(p, h, unit) for p, h in zip(parts, s.heads)]
    counts = allocate([pl[0] for pl in plans], n * len(parts)) if per_layer else [n] * len(parts)
    if compensate and any(counts):
        _ensure_bias(model, parts, "attn")
    removed = []
    for p, (_, heads), k, means in zip(parts, plans, counts, s.head_means):
        gone = heads[:k].flatten().sort().values
        removed.append(gone.tolist())
        if not k:
            continue
        keep_q = torch.tensor([h for h in range(p.num_heads) if h not in set(gone.tolist())])
        kv_rep = p.num_heads // p.num_kv_heads
        keep_kv = torch.unique(keep_q // kv_rep) if unit == "group" else torch.arange(p.num_kv_heads)
        if compensate:
            d = p.head_dim
            _compensate(p.out_proj, (gone[:, None] * d + torch.arange(d)).flatten(), means)
        keep_heads(p, keep_q, keep_kv)
    sync_config(model)
    _record(model, {"kind": "heads", "unit": unit, "removed": removed, "compensated": bool(compensate)})
    return model


# -- MLP -------------------------------------------------------------------------------------------------
def _rounded(n_keep: int, total: int, multiple_of: int) -> int:
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise SparsityError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    kept = max(multiple_of, multiple_of * round(n_keep / multiple_of))
    return min(kept, total)


@torch.no_grad()
def remove_mlp_channels(model: nn.Module, amount: int | float, calibration: Any = None, *, per_layer: bool = False,
                        multiple_of: int = 1, compensate: bool = False, metric: str = "l2",
                        scores: WidthScores | None = None) -> nn.Module:
    """Remove MLP intermediate neurons (a fraction in [0, 1) or a count per block) from every dense MLP in place;
    the kept width is rounded to a multiple of ``multiple_of``. MoE blocks are left to :func:`remove_experts`."""
    _, parts = model_parts(model)
    dense = [p for p in parts if p.mlp_out is not None]
    if not dense:
        raise SparsityError("the model has no dense MLP (its blocks are mixtures of experts); use remove_experts")
    widths = {p.mlp_width for p in dense}
    if not per_layer and len(widths) != 1:
        raise SparsityError("the blocks have different MLP widths already; pass per_layer=True")
    width = max(widths)
    n = count_units(amount, width, "MLP neurons per block")
    n = width - _rounded(width - n, width, multiple_of)
    s = _scores(model, calibration, scores, metric)
    mlp_scores = [m for p, m in zip(parts, s.mlp) if p.mlp_out is not None]
    means = [m for p, m in zip(parts, s.mlp_means) if p.mlp_out is not None]
    if per_layer:
        counts = allocate(mlp_scores, n * len(dense))
        counts = [p.mlp_width - _rounded(p.mlp_width - c, p.mlp_width, multiple_of) for p, c in zip(dense, counts)]
    else:
        counts = [n] * len(dense)
    if compensate and any(counts):
        _ensure_bias(model, dense, "mlp")
    removed = []
    for p, sc, k, mean in zip(dense, mlp_scores, counts, means):
        order = torch.argsort(sc, stable=True)
        gone, keep = order[:k].sort().values, order[k:].sort().values
        removed.append(gone.tolist())
        if k and compensate:
            _compensate(p.mlp_out, gone, mean)
        if k:
            keep_mlp(p, keep)
    sync_config(model)
    _record(model, {"kind": "mlp", "removed": removed, "compensated": bool(compensate)})
    return model


# -- hidden size -----------------------------------------------------------------------------------------
@torch.no_grad()
def remove_hidden(model: nn.Module, amount: int | float, calibration: Any = None, *, multiple_of: int = 1,
                  metric: str = "l2", scores: WidthScores | None = None) -> nn.Module:
    """Remove hidden (embedding) channels in place, scored by the summed activations of every norm over them:
    from the embeddings, every norm (RMSNorm weights rescaled, see ``keep_hidden``), every projection reading or
    writing the residual stream, routers, experts and the LM head. Exact when the removed channels carry zeros
    in an RMSNorm model; LayerNorm (GPT-2) re-centres, so there it is an approximation as in Minitron."""
    blocks, parts = model_parts(model)
    hidden_norms(model, blocks)  # an unknown norm raises here, before anything changes
    for p in parts:
        shared = getattr(p.mlp, "shared_expert", None) if p.mlp_kind == "moe" else None
        if shared is not None and not all(hasattr(shared, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise SparsityError(f"the shared expert ({type(shared).__name__}) is not a gated MLP")
    width = int(model.get_input_embeddings().weight.shape[1])
    n = count_units(amount, width, "hidden channels")
    n = width - _rounded(width - n, width, multiple_of)
    s = _scores(model, calibration, scores, metric)
    order = torch.argsort(s.hidden, stable=True)
    gone, keep = order[:n].sort().values, order[n:].sort().values
    if n:
        keep_hidden(model, blocks, parts, keep)
    sync_config(model)
    _record(model, {"kind": "hidden", "removed": gone.tolist()})
    return model


# -- config ----------------------------------------------------------------------------------------------
def sync_config(model: nn.Module) -> None:
    """Write the widths into ``model.config`` where they are uniform and the config can express them; leave the
    original values where not (per-block widths, GPT-2 heads / hidden size): ``save_pretrained`` then records the
    changed shapes for ``sparsetorch.shrink.from_pretrained``."""
    _sync_byte_config(model)
    config = getattr(model, "config", None)
    if config is None:
        return
    blocks, parts = model_parts(model)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    gqa = [p for p in parts if p.attn_kind == "gqa"]
    heads = {(p.num_heads, p.num_kv_heads) for p in gqa}
    if gqa and hasattr(config, "num_key_value_heads") and len(heads) == 1:
        config.head_dim = gqa[0].head_dim  # pinned: no longer hidden_size // heads once either changes
        config.num_attention_heads, config.num_key_value_heads = heads.pop()
    if gqa and hasattr(config, "hidden_size") and not hasattr(config, "n_embd"):
        config.hidden_size = hidden
    mlp = {p.mlp_width for p in parts if p.mlp_kind != "moe"}
    if len(mlp) == 1:
        key = "n_inner" if parts[0].mlp_kind == "gpt2" else "intermediate_size"
        if hasattr(config, key):
            setattr(config, key, mlp.pop())
    experts = {p.experts.num_experts for p in parts if p.experts is not None}
    if len(experts) == 1:
        n = experts.pop()
        for key in ("num_local_experts", "num_experts"):
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, n)
        if isinstance(getattr(config, "num_experts_per_tok", None), int):
            config.num_experts_per_tok = min(config.num_experts_per_tok, n)
        inside = {id(m) for b in blocks for m in b.modules()}
        for m in model.modules():  # the LM's own copies, for the router's auxiliary loss
            if id(m) not in inside and isinstance(getattr(m, "num_experts", None), int):
                m.num_experts = n
                if isinstance(getattr(m, "num_experts_per_tok", None), int):
                    m.num_experts_per_tok = min(m.num_experts_per_tok, n)


def _sync_byte_config(model: nn.Module) -> None:
    """sparsetorch's GPT: its frozen ``cfg`` gets the new hidden size and (when uniform) head count. The MLP width
    and head size it cannot say (it derives them from the width): the modules' shapes are the record, as in
    ``save_shrunk`` files and edge exports."""
    cfg = getattr(model, "cfg", None)
    if not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "width") or not hasattr(cfg, "heads"):
        return
    _, parts = model_parts(model)
    if not all(p.attn_kind == "byte" for p in parts):
        return
    heads = {p.num_heads for p in parts}
    model.cfg = dataclasses.replace(cfg, width=int(model.get_input_embeddings().weight.shape[1]),
                                    heads=heads.pop() if len(heads) == 1 else cfg.heads)
