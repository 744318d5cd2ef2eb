"""``sparsetorch.export_edge``: write a model as one compact file for the torch-free runtime ``sparsetorch.edge``.

The model is traced with torch.fx into a small layer graph (unsupported ops fail here, naming the
module); weights are stored in the smallest of dense / CSR (uint16 columns) / bitmask, optionally as int8
with per-row scales; the graph is JSON in the safetensors metadata. Before writing, the edge runtime
runs the example input and its output is compared with the model's (fp32 must match to float tolerance).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from ..edge.model import FORMAT, META_KEY, EdgeModel
from ..edge.weights import VALUE_TYPES, encode_matrix, weights_version
from ..errors import SparsityError
from ..tracing import TraceFailed, trace
from .edge_gpt import format_version
from .edge_graph import Converter, Graph

__all__ = ["export_edge"]

# fp32 export must reproduce the model to this relative tolerance (of the output's largest magnitude)
FP32_TOLERANCE = 1e-4


def export_edge(model: nn.Module, example_inputs, path: str | os.PathLike, values: str = "fp32") -> dict:
    """Write ``model`` to ``path`` for ``sparsetorch.edge.load``; returns the file's description.

    ``example_inputs``: one tensor (or a 1-tuple) of the input's shape; dim 0 (batch) may vary at run time.
    Token models (sparsetorch's GPT, transformers ``LlamaForCausalLM``, shrunk or pruned) take token ids
    [batch, length] and are exported whole, run with a KV cache by ``EdgeModel.generate``.
    ``values``: "fp32" (exact), "bf16" / "fp16" (half the value bytes; weights rounded to nearest) or "int8"
    (per-row symmetric weights; outputs move by a bounded amount, see docs/edge.md). The model is evaluated in eval mode; its training flags are restored afterwards.
    """
    if values not in VALUE_TYPES:
        raise SparsityError(f"values must be one of {VALUE_TYPES}, got {values!r}", values=values)
    x = _single_input(example_inputs)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        desc, arrays = build(model, x, values)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            expected = _reference(model, x.to(device))
    finally:
        for m, flag in flags.items():
            m.training = flag
    if not isinstance(expected, torch.Tensor):
        raise SparsityError("the model must return one tensor to be exported to the edge runtime")
    desc["check"] = _check(desc, arrays, x, expected.detach().float().cpu().numpy(), values)
    from safetensors.numpy import save

    from ..formats.atomic import atomic_write

    payload = save(arrays, metadata={META_KEY: json.dumps(desc, separators=(",", ":"))})
    atomic_write(Path(path), payload)
    return desc


def _single_input(example_inputs) -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise SparsityError(f"the edge runtime runs models with one tensor input; got {len(example_inputs)} "
                                "example inputs")
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 1:
        raise SparsityError("example_inputs must be a tensor with a batch dimension, e.g. torch.zeros(1, 64)")
    return example_inputs.detach().cpu()


def leaf_handlers() -> dict:
    """Modules exported as one edge node instead of being traced through (transformer stacks)."""
    from . import edge_gpt, edge_llama

    return {**edge_gpt.handlers(), **edge_llama.handlers()}


def _reference(model: nn.Module, x: torch.Tensor):
    """The model's output on x: a transformers causal LM's logits (through DecoderLogits), else model(x)."""
    if getattr(model, "config", None) is not None and callable(getattr(model, "get_input_embeddings", None)):
        from .onnx_decoder import DecoderLogits

        wrapped = DecoderLogits(model)
        try:
            return wrapped(x)
        finally:
            wrapped.unwrap()
    return model(x)


def build(model: nn.Module, x: torch.Tensor, values: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(description, arrays) of ``model``; raises SparsityError for what the runtime cannot run."""
    handlers = leaf_handlers()
    root = next((h for cls, h in handlers.items() if isinstance(model, cls)), None)
    if root is not None:  # the whole model is one runtime node (a transformer stack): nothing to trace
        conv = Converter(fx.GraphModule(model, fx.Graph()), handlers)
        conv.input_name, conv.output = "ids", "model"
        root(conv, "model", "", "ids", model)
    else:
        try:
            gm = trace(model, extra_leaves=tuple(handlers))
        except TraceFailed as exc:
            raise SparsityError(f"{exc}; the edge exporter needs a forward without data-dependent Python control "
                                "flow") from None
        conv = Converter(gm, handlers)
        conv.run()
    g = conv.g
    _split_groups(g)
    arrays: dict[str, np.ndarray] = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in g.raw.items()}
    tensors: dict[str, dict] = {}
    for name, w in g.matrices.items():
        parts, meta = encode_matrix(w, values)
        tensors[name] = meta
        arrays.update({f"{name}/{part}": np.ascontiguousarray(a) for part, a in parts.items()})
    integer = not torch.is_floating_point(x)
    shape = [None] + list(x.shape[1:])
    if integer:
        shape = [None] * x.dim()  # token ids: batch and sequence length vary
    desc = {"format": FORMAT, "version": max(format_version(g.nodes), weights_version(tensors)), "values": values,
            "input": {"name": conv.input_name, "shape": shape, "dtype": "int64" if integer else "float32"},
            "output": conv.output, "tensors": tensors, "nodes": g.nodes,
            "model": type(model).__name__}
    return desc, arrays


def _split_groups(g: Graph) -> None:
    """Conv weights [out, in/groups*k] -> one matrix (and bias) per group, as the runtime runs them."""
    for node in g.nodes:
        if node["op"] != "conv":
            continue
        w, b, groups = node.pop("weight"), node.pop("bias"), node["groups"]
        if groups == 1:
            node["weights"], node["biases"] = [w], [b]
            continue
        full = g.matrices.pop(w)
        bias = g.raw.pop(b) if b else None
        og = full.shape[0] // groups
        node["weights"], node["biases"] = [], []
        for i in range(groups):
            g.matrices[f"{w}.g{i}"] = full[i * og:(i + 1) * og]
            node["weights"].append(f"{w}.g{i}")
            if bias is not None:
                g.raw[f"{b}.g{i}"] = bias[i * og:(i + 1) * og]
            node["biases"].append(None if bias is None else f"{b}.g{i}")


def _check(desc: dict, arrays: dict, x: torch.Tensor, expected: np.ndarray, values: str) -> dict:
    """Run the edge graph on the example input; fp32 must match the model (else the export is refused)."""
    edge = EdgeModel(json.loads(json.dumps(desc)), dict(arrays))
    got = edge(x.numpy())
    if got.shape != expected.shape:
        raise SparsityError(f"internal export error: the edge graph returns shape {list(got.shape)} but the model "
                            f"{list(expected.shape)}; please report this model")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    err = float(np.abs(got - expected).max()) if expected.size else 0.0
    if values == "fp32" and err > FP32_TOLERANCE * max(scale, 1.0):
        raise SparsityError(f"internal export error: the edge graph differs from the model by {err:.3g} "
                            f"(output scale {scale:.3g}); please report this model")
    return {"max_abs_error": err, "max_abs_output": scale}
