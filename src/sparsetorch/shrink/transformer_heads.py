"""Attention heads and MLP widths of transformers GPT-2 and Llama-style models, found by name.

torch.fx cannot trace these models (dynamic shapes, caches), and their hidden size is shared by
every residual and normalized by LayerNorm/RMSNorm, so only heads and MLP hidden units are
removable. A GPT-2 head spans columns ``[h*d, (h+1)*d)`` of each of q, k, v in ``c_attn`` (weight
[in, 3E]) and rows of ``c_proj``; a Llama unit is one key/value head with its query heads.
"""
from __future__ import annotations

from torch import nn

from .groups import Group, Member

__all__ = ["hf_groups", "update_config", "is_hf_model", "is_llama_attention", "is_gated_mlp"]


def is_llama_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        and hasattr(m, "head_dim") and hasattr(m, "num_key_value_groups")


def is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def is_hf_model(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("GPT2Attention", "GPT2MLP") or is_llama_attention(m) or is_gated_mlp(m)
               for m in model.modules())


def hf_groups(model: nn.Module) -> tuple[list[Group], list[str]]:
    """Head and MLP groups of a GPT-2 or Llama-style model, and notes on what is skipped."""
    groups, notes = [], []
    for fqn, m in model.named_modules():
        p = f"{fqn}." if fqn else ""
        kind = type(m).__name__
        if kind == "GPT2Attention":
            if m.is_cross_attention:
                notes.append(f"{fqn}: cross-attention heads are not removed")
                continue
            d, e = m.head_dim, m.split_size
            members = [Member(p + "c_attn", "out", k * e, d, decides=(k == 2)) for k in range(3)]  # q, k, v
            members.append(Member(p + "c_proj", "in", 0, d))
            groups.append(Group(e // d, members, attrs=[(fqn, "num_heads", 1), (fqn, "split_size", d)]))
        elif kind == "GPT2MLP":
            groups.append(Group(m.c_fc.weight.shape[1], [Member(p + "c_fc", "out"), Member(p + "c_proj", "in")]))
        elif is_llama_attention(m):
            d, rep = m.head_dim, m.num_key_value_groups
            n_kv = m.k_proj.out_features // d
            # a value head decides: zero values make its query heads output zero whatever q and k are
            members = [Member(p + "q_proj", "out", 0, rep * d, decides=False), Member(p + "k_proj", "out", 0, d, decides=False),
                       Member(p + "v_proj", "out", 0, d), Member(p + "o_proj", "in", 0, rep * d)]
            groups.append(Group(n_kv, members))
        elif is_gated_mlp(m):
            # act(gate) * up is zero when either row is zero (act(0) = 0 for SiLU/GELU)
            members = [Member(p + "gate_proj", "out"), Member(p + "up_proj", "out"), Member(p + "down_proj", "in")]
            groups.append(Group(m.up_proj.out_features, members, zero_rule="any"))
    return groups, notes


def update_config(model: nn.Module) -> None:
    """Record uniform new head counts / MLP widths in ``model.config`` (per-layer ones live on the layers)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    gpt_heads = {m.num_heads for m in model.modules() if type(m).__name__ == "GPT2Attention"}
    gpt_mlp = {m.c_fc.weight.shape[1] for m in model.modules() if type(m).__name__ == "GPT2MLP"}
    llama = [m for m in model.modules() if is_llama_attention(m)]
    llama_heads = {(m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim) for m in llama}
    gated = {m.up_proj.out_features for m in model.modules() if is_gated_mlp(m)}
    if len(gpt_heads) == 1 and hasattr(config, "n_head"):
        config.n_head = gpt_heads.pop()
    if len(gpt_mlp) == 1 and hasattr(config, "n_inner"):
        config.n_inner = gpt_mlp.pop()
    if len(llama_heads) == 1 and hasattr(config, "num_key_value_heads"):
        config.head_dim = llama[0].head_dim  # pin it: it is no longer hidden_size // heads
        config.num_attention_heads, config.num_key_value_heads = llama_heads.pop()
    if len(gated) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = gated.pop()
