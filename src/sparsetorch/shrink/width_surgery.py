"""Slicing the layers of a transformers decoder: query heads, key/value groups, MLP neurons, experts, hidden channels.

Each function keeps the given indices of one kind of unit and updates the module attributes the forward reads
(``num_key_value_groups``, GPT-2's ``num_heads`` / ``split_size``, ``in_features``...). Which modules belong to a
block is recognised by structure (:func:`block_parts`) for Llama / Mistral / Qwen2 / Qwen3 (GQA), their MoE
variants (Mixtral, Qwen2-MoE, Qwen3-MoE: fused experts + a router), GPT-2 and sparsetorch's own byte GPT
(``sparsetorch.models.gpt``: one fused ``qkv`` Linear, ``fc``/``proj`` MLP); anything else raises before a weight is
touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparsityError
from ..models.gpt import Attention as ByteAttention
from ..models.gpt import MLPBlock as ByteMLP
from ..oneshot.experts import FusedExperts, fused_experts
from .transformer_heads import is_gated_mlp, is_llama_attention

__all__ = ["BlockParts", "block_parts", "hidden_norms", "keep_heads", "keep_mlp", "keep_experts", "keep_hidden",
           "take"]


@dataclass
class BlockParts:
    """The parts of one decoder block that width pruning changes."""

    attn: nn.Module
    attn_kind: str  # "gqa" (q/k/v/o Linears), "gpt2" or "byte" (sparsetorch's GPT: fused qkv Linear)
    mlp: nn.Module
    mlp_kind: str  # "gated", "gpt2", "byte" (fc/proj Linears) or "moe"
    experts: FusedExperts | None = None
    router: nn.Module | None = None

    @property
    def num_heads(self) -> int:
        if self.attn_kind == "gpt2":
            return self.attn.num_heads
        if self.attn_kind == "byte":
            return self.attn.heads
        return self.attn.q_proj.out_features // self.attn.head_dim

    @property
    def num_kv_heads(self) -> int:
        if self.attn_kind != "gqa":
            return self.num_heads
        return self.attn.k_proj.out_features // self.attn.head_dim

    @property
    def head_dim(self) -> int:
        return self.attn.head_dim

    @property
    def out_proj(self) -> nn.Module:
        """The layer reading the heads' outputs (its columns are ``head * head_dim + [0, head_dim)``)."""
        return {"gpt2": getattr(self.attn, "c_proj", None), "byte": getattr(self.attn, "proj", None)}.get(
            self.attn_kind, getattr(self.attn, "o_proj", None))

    @property
    def mlp_out(self) -> nn.Module | None:
        """The layer reading the MLP's intermediate neurons."""
        return {"gated": getattr(self.mlp, "down_proj", None), "gpt2": getattr(self.mlp, "c_proj", None),
                "byte": getattr(self.mlp, "proj", None)}.get(self.mlp_kind)

    @property
    def mlp_width(self) -> int:
        if self.mlp_kind == "gated":
            return self.mlp.up_proj.out_features
        if self.mlp_kind == "byte":
            return self.mlp.fc.out_features
        return self.mlp.c_fc.weight.shape[1] if self.mlp_kind == "gpt2" else 0


def _router(block: nn.Module, experts: int) -> nn.Module | None:
    for child in block.children():
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == experts and hasattr(child, "top_k"):
            return child
    return None


def block_parts(block: nn.Module, where: str) -> BlockParts:
    """The attention and MLP of decoder block ``block`` (named ``where`` in errors)."""
    if isinstance(getattr(block, "attn", None), ByteAttention) and isinstance(getattr(block, "mlp", None), ByteMLP):
        return BlockParts(block.attn, "byte", block.mlp, "byte")
    attn = next((m for m in block.modules() if is_llama_attention(m) or type(m).__name__ == "GPT2Attention"), None)
    if attn is None:
        raise SparsityError(f"{where} ({type(block).__name__}) has no attention width pruning understands (q/k/v/o "
                            "Linears with head_dim, as in Llama, Mistral, Qwen2/3, or GPT-2's GPT2Attention)")
    attn_kind = "gpt2" if type(attn).__name__ == "GPT2Attention" else "gqa"
    if attn_kind == "gpt2" and attn.is_cross_attention:
        raise SparsityError(f"{where}: cross-attention is not supported by width pruning")
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise SparsityError(f"{where} ({type(block).__name__}) has no .mlp")
    if type(mlp).__name__ == "GPT2MLP":
        return BlockParts(attn, attn_kind, mlp, "gpt2")
    if is_gated_mlp(mlp):
        return BlockParts(attn, attn_kind, mlp, "gated")
    experts = getattr(mlp, "experts", None)
    layout = fused_experts(experts, f"{where}.mlp.experts") if experts is not None else None
    router = _router(mlp, layout.num_experts) if layout is not None else None
    if layout is None or router is None:
        raise SparsityError(f"{where}.mlp ({type(mlp).__name__}) is neither a gated MLP (gate/up/down_proj), GPT-2's "
                            "MLP nor a mixture of fused experts with a router; width pruning does not apply")
    return BlockParts(attn, attn_kind, mlp, "moe", layout, router)


def hidden_norms(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """Every normalisation over the hidden size: the blocks' pre-attention/pre-MLP norms and the final norm.
    Only LayerNorm and Llama-style RMSNorm (``weight * x / rms``, ``variance_epsilon``) are understood."""
    found = []
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    for block in blocks:
        for name, m in block.named_children():
            if "norm" in name.lower() or name.startswith("ln"):  # ln_1 (GPT-2), ln1 (sparsetorch's GPT)
                found.append(m)
    found += [m for m in model.modules() if id(m) not in in_blocks and _is_norm(m)]
    for m in found:
        if not _is_norm(m):
            raise SparsityError(f"{type(m).__name__} normalises the hidden size but is neither LayerNorm nor a "
                                "Llama-style RMSNorm; hidden-size pruning does not apply")
    return found


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or (type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
                                           and isinstance(getattr(m, "weight", None), torch.Tensor))


# -- slicing one parameter (Parameters stay Parameters, tied parameters stay tied) -------------------------
def take(module: nn.Module, name: str, dim: int, keep: torch.Tensor, cache: dict | None = None) -> None:
    """Keep indices ``keep`` of ``module.<name>`` along ``dim``; ``cache`` (old id -> new) keeps ties."""
    old = getattr(module, name, None)
    if old is None:
        return
    cache = {} if cache is None else cache
    new = cache.get(id(old))
    if new is None:
        data = old.detach().index_select(dim, keep.to(old.device)).clone()
        new = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
        cache[id(old)] = new
    if isinstance(new, nn.Parameter):
        module._parameters[name] = new
    else:
        module._buffers[name] = new


def _rows(width: int, keep: torch.Tensor) -> torch.Tensor:
    """Indices of units ``keep`` of ``width`` consecutive elements each."""
    return (keep[:, None] * width + torch.arange(width)).flatten()


def _linear_out(m: nn.Linear, idx: torch.Tensor) -> None:
    take(m, "weight", 0, idx)
    take(m, "bias", 0, idx)
    m.out_features = m.weight.shape[0]


def _linear_in(m: nn.Linear, idx: torch.Tensor, cache: dict | None = None) -> None:
    take(m, "weight", 1, idx, cache)
    m.in_features = m.weight.shape[1]


def _conv1d(m: nn.Module, idx: torch.Tensor, side: str) -> None:
    """transformers' Conv1D (weight [in, out]): keep inputs (``side="in"``) or outputs (weight columns + bias)."""
    if side == "in":
        take(m, "weight", 0, idx)
    else:
        take(m, "weight", 1, idx)
        take(m, "bias", 0, idx)
    m.nx, m.nf = m.weight.shape


def keep_heads(parts: BlockParts, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    """Keep query heads ``keep_q`` and key/value heads ``keep_kv`` (every kept group the same size)."""
    d = parts.head_dim
    if parts.attn_kind == "gpt2":
        attn, e = parts.attn, parts.attn.split_size
        cols = torch.cat([k * e + _rows(d, keep_q) for k in range(3)])  # q, k and v thirds of c_attn
        _conv1d(attn.c_attn, cols, "out")
        _conv1d(attn.c_proj, _rows(d, keep_q), "in")
        attn.num_heads, attn.split_size = len(keep_q), len(keep_q) * d
        return
    if parts.attn_kind == "byte":
        attn, inner = parts.attn, parts.attn.qkv.out_features // 3
        _linear_out(attn.qkv, torch.cat([k * inner + _rows(d, keep_q) for k in range(3)]))  # q, k, v thirds
        _linear_in(attn.proj, _rows(d, keep_q))
        attn.heads = len(keep_q)
        return
    attn = parts.attn
    _linear_out(attn.q_proj, _rows(d, keep_q))
    _linear_out(attn.k_proj, _rows(d, keep_kv))
    _linear_out(attn.v_proj, _rows(d, keep_kv))
    _linear_in(attn.o_proj, _rows(d, keep_q))
    attn.num_key_value_groups = len(keep_q) // len(keep_kv)
    for attr, value in (("num_heads", len(keep_q)), ("num_attention_heads", len(keep_q)),
                        ("num_key_value_heads", len(keep_kv))):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)


def keep_mlp(parts: BlockParts, keep: torch.Tensor) -> None:
    """Keep intermediate neurons ``keep`` of a gated or GPT-2 MLP."""
    mlp = parts.mlp
    if parts.mlp_kind == "gpt2":
        _conv1d(mlp.c_fc, keep, "out")
        _conv1d(mlp.c_proj, keep, "in")
        return
    if parts.mlp_kind == "byte":
        _linear_out(mlp.fc, keep)
        _linear_in(mlp.proj, keep)
        return
    _linear_out(mlp.gate_proj, keep)
    _linear_out(mlp.up_proj, keep)
    _linear_in(mlp.down_proj, keep)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(keep)


def keep_experts(parts: BlockParts, keep: torch.Tensor) -> None:
    """Keep experts ``keep`` of an MoE block: their weights and their router rows; top-k capped at what is left."""
    layout, router, n = parts.experts, parts.router, len(keep)
    for name, p in list(layout.module.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == layout.num_experts:
            take(layout.module, name, 0, keep)
    for name in ("weight", "bias", "e_score_correction_bias"):
        p = getattr(router, name, None)
        if isinstance(p, torch.Tensor) and p.shape[0] == layout.num_experts:
            take(router, name, 0, keep)
    for m in (layout.module, router, parts.mlp):
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, n)
        if isinstance(getattr(m, "top_k", None), int):
            m.top_k = min(m.top_k, n)
    parts.experts = fused_experts(layout.module)


def keep_hidden(model: nn.Module, blocks: nn.ModuleList, parts: list[BlockParts], keep: torch.Tensor) -> None:
    """Keep hidden channels ``keep`` everywhere: embeddings, norms, every projection into and out of the residual
    stream, routers, experts and the LM head. RMSNorm weights are scaled by sqrt(H / H') so that the norm of a
    stream whose removed channels were zero is unchanged (its mean square is taken over H' channels now)."""
    old = int(model.get_input_embeddings().weight.shape[1])
    norms = hidden_norms(model, blocks)  # raises for a norm it does not understand, before anything changes
    cache: dict = {}  # tied embeddings / LM head stay one tensor
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.embedding_dim == old and not any(m is x for b in blocks for x in b.modules()):
            take(m, "weight", 1, keep, cache)
            m.embedding_dim = len(keep)
    for norm in norms:
        take(norm, "weight", 0, keep)
        take(norm, "bias", 0, keep)
        if isinstance(norm, nn.LayerNorm):
            norm.normalized_shape = (len(keep),)
        else:
            with torch.no_grad():
                norm.weight.mul_((old / len(keep)) ** 0.5)  # rms over H' instead of H channels
    for p in parts:
        if p.attn_kind == "gpt2":
            _conv1d(p.attn.c_attn, keep, "in")
            _conv1d(p.attn.c_proj, keep, "out")
        elif p.attn_kind == "byte":
            _linear_in(p.attn.qkv, keep)
            _linear_out(p.attn.proj, keep)
        else:
            for lin in (p.attn.q_proj, p.attn.k_proj, p.attn.v_proj):
                _linear_in(lin, keep)
            _linear_out(p.attn.o_proj, keep)
        if p.mlp_kind == "gpt2":
            _conv1d(p.mlp.c_fc, keep, "in")
            _conv1d(p.mlp.c_proj, keep, "out")
        elif p.mlp_kind == "byte":
            _linear_in(p.mlp.fc, keep)
            _linear_out(p.mlp.proj, keep)
        elif p.mlp_kind == "gated":
            _linear_in(p.mlp.gate_proj, keep)
            _linear_in(p.mlp.up_proj, keep)
            _linear_out(p.mlp.down_proj, keep)
        else:
            _hidden_moe(p, keep)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.in_features == old:
        _linear_in(head, keep, cache)


def _hidden_moe(p: BlockParts, keep: torch.Tensor) -> None:
    layout, n = p.experts, len(keep)
    up_dim, down_dim = (1, 2) if layout.transposed else (2, 1)  # [E, out, in] or [E, in, out]
    take(layout.module, layout.up, up_dim, keep)
    take(layout.module, layout.down, down_dim, keep)
    bias = getattr(layout.module, f"{layout.down}_bias", None)
    if isinstance(bias, torch.Tensor):
        take(layout.module, f"{layout.down}_bias", 1, keep)
    if isinstance(getattr(layout.module, "hidden_dim", None), int):
        layout.module.hidden_dim = n
    take(p.router, "weight", 1, keep)
    if isinstance(getattr(p.router, "hidden_dim", None), int):
        p.router.hidden_dim = n
    shared = getattr(p.mlp, "shared_expert", None)
    if shared is not None:
        if not is_gated_mlp(shared):
            raise SparsityError(f"the shared expert ({type(shared).__name__}) is not a gated MLP")
        _linear_in(shared.gate_proj, keep)
        _linear_in(shared.up_proj, keep)
        _linear_out(shared.down_proj, keep)
    gate = getattr(p.mlp, "shared_expert_gate", None)
    if isinstance(gate, nn.Linear):
        _linear_in(gate, keep)
