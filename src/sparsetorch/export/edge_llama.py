"""Exporting a transformers ``LlamaForCausalLM`` as one edge "llama" node (the runtime runs it with a KV cache).

As for the byte GPT, the model is not traced: the exporter checks that its structure is the one the runtime
implements (RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP) and writes the weights under
their transformers names. Every width is read from the modules, so models shrunk by ``sparsetorch.shrink``
(per-block heads, MLP and hidden widths) export as they are; pruned weights are stored compactly like any
other. Anything the runtime would compute differently is refused here, naming the feature.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import SparsityError
from .edge_graph import dense_weight, to_numpy

# rope types whose frequencies are fixed once the model is built (transformers' "dynamic" and "longrope"
# recompute them from the sequence length); the runtime applies the stored inv_freq and attention_scaling
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# config attributes of Llama relatives whose computation the runtime does not implement, when set
UNSUPPORTED_CONFIG = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "logit_scale")


def handlers() -> dict:
    """{LlamaForCausalLM: export_llama} when transformers' Llama is imported (a Llama model implies it is): the
    exporter never imports transformers itself."""
    module = sys.modules.get("transformers.models.llama.modeling_llama")
    return {} if module is None else {module.LlamaForCausalLM: export_llama}


def _refuse(what: str, fix: str = "") -> SparsityError:
    return SparsityError(f"cannot export this Llama to the edge runtime: {what} is not supported"
                         f"{'; ' + fix if fix else ''}", feature=what)


def _check_config(model: nn.Module) -> None:
    cfg = model.config
    for attr in UNSUPPORTED_CONFIG:
        if getattr(cfg, attr, None) not in (None, False):
            raise _refuse(f"config.{attr}={getattr(cfg, attr)!r}")
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise _refuse(f"hidden_act={cfg.hidden_act!r} (the runtime's MLP is SiLU-gated)")
    rope = model.model.rotary_emb
    if rope.rope_type not in STATIC_ROPE:
        raise _refuse(f"rope scaling {rope.rope_type!r} (its frequencies change with the sequence length)",
                      f"the runtime supports rope types {', '.join(STATIC_ROPE)}")


def _lin(conv, name: str, lin: nn.Module, bias: bool) -> None:
    if not isinstance(lin, nn.Linear) or (lin.bias is not None) != bias:
        raise _refuse(f"{name} as {type(lin).__name__} {'without' if bias else 'with'} a bias "
                      "(expected an nn.Linear like its siblings)")
    conv.g.matrices[f"{name}.weight"] = to_numpy(dense_weight(lin))
    if bias:
        conv.g.add_raw(f"{name}.bias", lin.bias)


def _norm(conv, name: str, norm: nn.Module) -> float:
    if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "weight", None) is None:
        raise _refuse(f"{name} as {type(norm).__name__} (expected an RMSNorm with a weight)")
    conv.g.add_raw(f"{name}.weight", norm.weight)
    return float(norm.variance_epsilon)


def _block(conv, p: str, layer: nn.Module, head_dim: int, biases: tuple[bool, bool]) -> tuple[int, int, float]:
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn, "head_dim", None) != head_dim:
        raise _refuse(f"{p}self_attn with head size {getattr(attn, 'head_dim', None)} next to {head_dim}")
    if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        raise _refuse(f"{p}mlp.act_fn {type(mlp.act_fn).__name__} (expected SiLU)")
    for sub in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _lin(conv, f"{p}self_attn.{sub}", getattr(attn, sub), biases[0])
    for sub in ("gate_proj", "up_proj", "down_proj"):
        _lin(conv, f"{p}mlp.{sub}", getattr(mlp, sub), biases[1])
    heads, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    if heads < 1 or kv < 1 or attn.q_proj.out_features % head_dim or heads != kv * attn.num_key_value_groups:
        raise _refuse(f"{p}self_attn with {attn.q_proj.out_features} query / {attn.k_proj.out_features} key "
                      f"outputs for head size {head_dim} and {attn.num_key_value_groups} query heads per key/value "
                      "head (a block without heads, or inconsistent head counts)")
    return heads, kv, float(attn.scaling)


def export_llama(conv, name: str, prefix: str, x: str, model: nn.Module) -> None:
    _check_config(model)
    inner, cfg = model.model, model.config
    layers = list(inner.layers)
    if not layers:
        raise _refuse("a model without blocks")
    head_dim = int(layers[0].self_attn.head_dim)
    embed = inner.embed_tokens
    vocab, width = (int(d) for d in embed.weight.shape)
    conv.g.matrices[f"{prefix}model.embed_tokens.weight"] = to_numpy(dense_weight(embed))
    a0, m0 = layers[0].self_attn, layers[0].mlp
    biases = (a0.q_proj.bias is not None, m0.up_proj.bias is not None)
    eps = {_norm(conv, f"{prefix}model.norm", inner.norm)}
    heads, kv_heads, scaling = [], [], set()
    for i, layer in enumerate(layers):
        p = f"{prefix}model.layers.{i}."
        eps |= {_norm(conv, f"{p}input_layernorm", layer.input_layernorm),
                _norm(conv, f"{p}post_attention_layernorm", layer.post_attention_layernorm)}
        h, k, s = _block(conv, p, layer, head_dim, biases)
        heads.append(h)
        kv_heads.append(k)
        scaling.add(s)
    if len(eps) != 1 or len(scaling) != 1:
        raise _refuse(f"RMSNorm eps {sorted(eps)} / attention scalings {sorted(scaling)} that differ between blocks")
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise _refuse(f"lm_head as {type(head).__name__} with a bias" if isinstance(head, nn.Linear) else
                      f"lm_head as {type(head).__name__}")
    tied = head.weight is embed.weight and torch.equal(dense_weight(head), dense_weight(embed))
    lm_head = f"{prefix}model.embed_tokens.weight" if tied else f"{prefix}lm_head.weight"
    if not tied:
        conv.g.matrices[lm_head] = to_numpy(dense_weight(head))
    rope = inner.rotary_emb
    inv_freq = f"{prefix}model.rotary_emb.inv_freq"
    conv.g.add_raw(inv_freq, rope.inv_freq)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])]
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    conv.g.nodes.append({
        "op": "llama", "name": name, "inputs": [x], "prefix": prefix, "layers": len(layers), "width": width,
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "context": int(cfg.max_position_embeddings),
        "vocab": vocab, "eps": eps.pop(), "scaling": scaling.pop(), "attention_bias": biases[0],
        "mlp_bias": biases[1], "lm_head": lm_head, "tied": tied, "inv_freq": inv_freq,
        "attention_scaling": float(rope.attention_scaling), "rope_type": rope.rope_type,
        "rope_theta": params.get("rope_theta", getattr(cfg, "rope_theta", None)), "eos": eos})
