"""The one table of elementwise activations, by how a model applies them: module, function or tensor method.

Names are the kinds the edge runtime and the fused chain kernels implement: "relu", "gelu", "silu", "tanh",
"sigmoid"; :func:`activation_of` also tells GELU's tanh approximation apart ("gelu_tanh").
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS", "module_activation", "activation_of"]

ACTIVATION_MODULES: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh",
                                                  nn.Sigmoid: "sigmoid"}
ACTIVATION_FUNCTIONS: dict[Callable, str] = {torch.relu: "relu", F.relu: "relu", F.gelu: "gelu", F.silu: "silu",
                                             torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
                                             F.sigmoid: "sigmoid"}
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


def module_activation(mod: nn.Module | None) -> str | None:
    """The activation an activation module computes ("gelu_tanh" for tanh-approximated GELU), else None."""
    if type(mod) is nn.GELU:
        return _GELU.get(mod.approximate)
    return ACTIVATION_MODULES.get(type(mod))


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation an fx node applies to its only tensor argument (None if it is not one, or has other
    arguments the activation does not take)."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return module_activation(modules.get(node.target))
    if node.op == "call_function" and len(node.args) == 1:
        kw = dict(node.kwargs)
        kw.pop("inplace", None)
        if node.target is F.gelu and set(kw) <= {"approximate"}:
            return _GELU.get(kw.get("approximate", "none"))
        return None if kw else ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return ACTIVATION_METHODS.get(node.target)
    return None
