"""Exporting sparsetorch's byte-level GPT as one edge "gpt" node (the runtime runs it with a KV cache).

The transformer is not traced op by op: its structure (pre-LN blocks of causal attention and a GELU MLP,
learned positions) is what the runtime implements, so the exporter checks that structure and writes
the weights under the module's own parameter names.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparsityError
from .edge_graph import dense_weight, to_numpy


def handlers() -> dict:
    """{module class: handler(converter, name, prefix, input_ref, module)} for stacks the runtime knows."""
    try:
        from ..models.gpt import GPT
    except ImportError:
        return {}
    return {GPT: export_gpt}


def _ln(conv, prefix: str, ln: nn.Module) -> float:
    if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
        raise SparsityError(f"{prefix}: expected a LayerNorm over the last dim with weight and bias")
    conv.g.add_raw(f"{prefix}.weight", ln.weight)
    conv.g.add_raw(f"{prefix}.bias", ln.bias)
    return float(ln.eps)


def _lin(conv, prefix: str, lin: nn.Module, bias: bool = True) -> None:
    if not isinstance(lin, nn.Linear) or (lin.bias is None) == bias:
        raise SparsityError(f"{prefix}: expected an nn.Linear {'with' if bias else 'without'} bias")
    conv.g.matrices[f"{prefix}.weight"] = to_numpy(dense_weight(lin))
    if bias:
        conv.g.add_raw(f"{prefix}.bias", lin.bias)


def export_gpt(conv, name: str, prefix: str, x: str, gpt: nn.Module) -> None:
    cfg = gpt.cfg
    width = int(gpt.tok.weight.shape[1])  # the modules, not cfg: sparsetorch.shrink may have cut any width
    heads = []
    for emb in ("tok", "pos"):
        conv.g.matrices[f"{prefix}{emb}.weight"] = to_numpy(dense_weight(getattr(gpt, emb)))
    eps = {_ln(conv, f"{prefix}ln_f", gpt.ln_f)}
    for i, block in enumerate(gpt.blocks):
        p = f"{prefix}blocks.{i}."
        eps |= {_ln(conv, f"{p}ln1", block.ln1), _ln(conv, f"{p}ln2", block.ln2)}
        qkv, h = block.attn.qkv.out_features, block.attn.heads
        if qkv % (3 * h) or block.attn.proj.in_features != qkv // 3:
            raise SparsityError(f"{p}attn: qkv width {qkv} is not 3 x {h} heads x a head size read by proj's "
                                f"{block.attn.proj.in_features} inputs")
        heads.append(h)
        for sub in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            _lin(conv, p + sub, block.get_submodule(sub))
    _lin(conv, f"{prefix}lm_head", gpt.lm_head, bias=False)
    if len(eps) != 1:
        raise SparsityError(f"{type(gpt).__name__}: LayerNorms with different eps {sorted(eps)} are not supported")
    # format version 1 runtimes split q, k, v into `heads` heads of width / heads each: say the heads per block
    # (version 2) only when a shrunk model needs it, so that unshrunk exports still load in version 1 runtimes
    plain = len(set(heads)) == 1 and all(b.attn.qkv.out_features == 3 * width for b in gpt.blocks)
    conv.g.nodes.append({"op": "gpt", "name": name, "inputs": [x], "prefix": prefix, "layers": len(gpt.blocks),
                         "width": width, "heads": heads[0] if plain and heads else heads, "context": cfg.context,
                         "vocab": cfg.vocab, "eps": eps.pop()})


def format_version(nodes: list[dict]) -> int:
    """The oldest edge format version that describes ``nodes`` (2: a gpt node with heads per block; 3: a llama
    node)."""
    if any(n["op"] == "llama" for n in nodes):
        return 3
    return 2 if any(n["op"] == "gpt" and isinstance(n.get("heads"), list) for n in nodes) else 1


def torch_generate(model: nn.Module, prompt: bytes, n: int) -> bytes:
    """Reference greedy decoding with the torch model (no cache; crops to the context like nanoGPT)."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids[:, -model.cfg.context:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return bytes(ids[0].tolist())
