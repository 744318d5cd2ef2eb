"""Linear-like layers and the input statistics one-shot pruning collects from them.

A layer is *linear-like* if it computes ``x @ W^T + b`` on the last input dimension:
``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed ``[in, out]``.
All math uses the ``[out, in]`` view.
"""
from __future__ import annotations

import torch
from torch import nn


def is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` view of the layer's weight (no copy)."""
    return module.weight.t() if is_transposed(module) else module.weight


def in_features(module: nn.Module) -> int:
    return weight_2d(module).shape[1]


def to_param_layout(module: nn.Module, tensor_2d: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` tensor laid out like the module's weight."""
    return tensor_2d.t().contiguous() if is_transposed(module) else tensor_2d


class InputStats:
    """Running statistics of a layer's inputs X ``[n, in]``: the per-input squared norms (Wanda)
    and, when ``hessian`` is set, X^T X (SparseGPT). Float32 on ``device``."""

    def __init__(self, features: int, device: torch.device, hessian: bool) -> None:
        self.count = 0
        self.sq_norm = torch.zeros(features, dtype=torch.float32, device=device)  # sum_n x_j^2
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.sq_norm.device, dtype=torch.float32)  # [n, in]
        self.count += x.shape[0]
        self.sq_norm += x.square().sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (the curvature of the layer-wise squared reconstruction error)."""
        assert self.xtx is not None and self.count > 0
        return self.xtx * (2.0 / self.count)


def attach_stats(layers: dict[str, nn.Module], device: torch.device, hessian: bool):
    """Register forward hooks feeding an ``InputStats`` per layer; returns (stats, handles)."""
    stats = {name: InputStats(in_features(m), device, hessian) for name, m in layers.items()}
    handles = []
    for name, module in layers.items():
        def hook(_module, inputs, _output, s=stats[name]):
            s.add(inputs[0])
        handles.append(module.register_forward_hook(hook))
    return stats, handles
