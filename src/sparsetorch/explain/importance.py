"""Input-feature and connection importance from the surviving connections."""
from __future__ import annotations

import heapq
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparsityError
from ..core.masks import get_mask
from ..core.layer_selection import DEFAULT_TYPES
from .abs_network import abs_network

__all__ = ["feature_importance", "critical_connections", "top_paths"]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DEFAULT_TYPES)]


def feature_importance(
    model: nn.Module,
    method: str = "paths",
    *,
    input_shape: tuple[int, ...] | None = None,
    data: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance of each input feature, shaped like one input sample.

    Methods:
        "connectivity": sum of |W| over the kept connections leaving each input in the first
            layer (for a first Conv layer, summed over every position the input pixel feeds).
        "paths": sum over every kept input-to-output path of the product of |w| along it
            (SynFlow-style path flow through the absolute network; exact for ReLU nets).
        "grad_x_input": mean |x * d(logit of the true class)/dx| over ``data`` (data-driven
            comparison; needs ``data``, uses ``targets`` or the predicted class).
    ``input_shape`` is one sample's shape (e.g. ``(64,)`` or ``(1, 8, 8)``); inferred from
    ``data`` or the first layer's ``in_features`` when not given.
    """
    if method == "grad_x_input":
        return _grad_x_input(model, data, targets)
    if method not in ("connectivity", "paths"):
        raise SparsityError(f"unknown method {method!r}; use 'connectivity', 'paths' or 'grad_x_input'")
    shape = _input_shape(model, input_shape, data)
    if method == "connectivity":
        name, first = _layers(model)[0]
        probe = nn.Sequential(first)
        return _path_flow(probe, shape)
    return _path_flow(model, shape)


def _input_shape(model, input_shape, data) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    if data is not None:
        return tuple(data.shape[1:])
    layers = _layers(model)
    if layers and isinstance(layers[0][1], nn.Linear):
        return (layers[0][1].in_features,)
    raise SparsityError("cannot infer the input shape of a model starting with a Conv layer; pass input_shape=")


def _path_flow(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    net = abs_network(model)
    x = torch.ones((1, *shape), dtype=torch.float64, requires_grad=True)
    net(x).sum().backward()
    return x.grad[0].float()


def _grad_x_input(model: nn.Module, data: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
    if data is None or len(data) == 0:
        raise SparsityError("method='grad_x_input' needs data=<a batch of inputs>")
    was_training = model.training
    model.eval()
    try:
        x = data.detach().clone().float().requires_grad_(True)
        logits = model(x)
        labels = targets if targets is not None else logits.argmax(dim=1)
        logits.gather(1, labels.reshape(-1, 1)).sum().backward()
    finally:
        model.train(was_training)
    return (x.grad * x).abs().mean(dim=0).detach()


def critical_connections(model: nn.Module, k: int = 10, *, input_shape: tuple[int, ...] | None = None) -> list[dict]:
    """The ``k`` kept connections carrying the most path flow, over all layers.

    A connection's flow is |w| times the path flow reaching its source from the inputs times
    the flow from its target to the outputs, i.e. the SynFlow score |w * dR/dw| of the
    absolute network. Returns dicts ``{layer, index, weight, flow}`` sorted by flow.
    """
    shape = _input_shape(model, input_shape, None)
    net = abs_network(model)
    net(torch.ones((1, *shape), dtype=torch.float64)).sum().backward()
    found = []
    originals = dict(model.named_modules())
    for name, module in _layers(net):
        flow = (module.weight * module.weight.grad).detach().flatten()
        top = torch.topk(flow, min(k, flow.numel()))
        weight = originals[name].weight.detach().flatten()
        for value, idx in zip(top.values.tolist(), top.indices.tolist()):
            if value > 0:
                index = tuple(torch.unravel_index(torch.tensor(idx), module.weight.shape))
                found.append({"layer": name, "index": tuple(int(i) for i in index),
                              "weight": float(weight[idx]), "flow": value})
    return heapq.nlargest(k, found, key=lambda row: row["flow"])


def top_paths(model: nn.Module, k: int = 5) -> list[dict]:
    """The ``k`` input-to-output paths with the largest product of |w| in a Linear chain (beam search).

    Returns dicts ``{units: [input, hidden..., output], product}``; only for models whose
    prunable layers form a chain of Linear layers (e.g. an MLP).
    """
    layers = [m for _, m in _layers(model)]
    if not layers or not all(isinstance(m, nn.Linear) for m in layers):
        raise SparsityError("top_paths needs a chain of Linear layers (an MLP); use critical_connections otherwise")
    weights = []
    for m in layers:
        mask = get_mask(m)
        weights.append((m.weight.detach().abs() * (mask if mask is not None else 1)).double())
    # beam[j] = best k (log-product, path) ending at unit j of the current layer
    beams: list[list[tuple[float, list[int]]]] = [[(0.0, [i])] for i in range(weights[0].shape[1])]
    for w in weights:
        logw = torch.where(w > 0, w.log(), torch.full_like(w, float("-inf")))
        new: list[list[tuple[float, list[int]]]] = []
        for j in range(w.shape[0]):
            sources = torch.nonzero(torch.isfinite(logw[j])).flatten().tolist()
            cands = [(score + float(logw[j, i]), path + [j]) for i in sources for score, path in beams[i]]
            new.append(heapq.nlargest(k, cands, key=lambda c: c[0]))
        beams = new
    best = heapq.nlargest(k, (c for beam in beams for c in beam), key=lambda c: c[0])
    return [{"units": path, "product": float(torch.tensor(score).exp())} for score, path in best]
