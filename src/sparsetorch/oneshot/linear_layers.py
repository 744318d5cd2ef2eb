"""Linear-like layers and the input statistics one-shot pruning collects from them.

A layer is *linear-like* if it computes ``x @ W^T + b`` on the last input dimension:
``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed ``[in, out]``.
All math uses the ``[out, in]`` view.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.masks import get_mask, set_mask


def is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def mask_zeros(model: nn.Module) -> int:
    """Give every Linear-like layer of ``model`` that holds zeros and has no mask the mask of its nonzeros
    (a pruned model read back from a plain checkpoint, zeros in place). Returns how many got one."""
    count = 0
    for _, module in model.named_modules():
        w = getattr(module, "weight", None)
        if is_linear_like(module) and w is not None and get_mask(module) is None and bool((w == 0).any()):
            set_mask(module, w.detach() != 0)
            count += 1
    return count


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


class TokenMask:
    """Which positions of the sample now running are real tokens (``[batch, seq]`` bool, None = all).

    The driver sets ``current`` before each calibration item; the statistics hooks drop the
    padded positions of any input shaped ``[batch, seq, features]`` like it, or flattened to
    ``[batch * seq, features]`` (what an MoE layer hands its shared expert and its experts)."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    def rows(self, n: int) -> torch.Tensor | None:
        """Which of ``n`` flattened token positions are real (``[n]`` bool), None if unknown for ``n``."""
        mask = self.current
        return mask.reshape(-1) if mask is not None and mask.numel() == n else None

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., features]`` as ``[n, features]`` rows of real tokens only."""
        mask = self.current
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.to(x.device)]
        real = self.rows(x.shape[0]) if x.dim() == 2 else None
        if real is not None:
            return x[real.to(x.device)]
        return x.reshape(-1, x.shape[-1])


class InputStats:
    """Running statistics of a layer's inputs X ``[n, in]``: the count, per-input sums and squared
    norms (Wanda, OWL, RIA; the mean for DSnoT) and, when ``hessian`` is set, X^T X (SparseGPT,
    ALPS, DSnoT). Float32 on ``device``."""

    def __init__(self, features: int, device: torch.device, hessian: bool) -> None:
        self.count = 0
        self.sum = torch.zeros(features, dtype=torch.float32, device=device)  # sum_n x_j
        self.sq_norm = torch.zeros(features, dtype=torch.float32, device=device)  # sum_n x_j^2
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x [n, in]``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.sq_norm.device, dtype=torch.float32)  # [n, in]
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sq_norm += x.square().sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (the curvature of the layer-wise squared reconstruction error)."""
        assert self.xtx is not None and self.count > 0
        return self.xtx * (2.0 / self.count)


def attach_stats(layers: dict[str, nn.Module], device: torch.device, hessian: bool,
                 tokens: TokenMask | None = None):
    """Register forward hooks feeding an ``InputStats`` per layer; returns (stats, handles).
    With ``tokens``, padded positions are left out."""
    stats = {name: InputStats(in_features(m), device, hessian) for name, m in layers.items()}
    handles = []
    for name, module in layers.items():
        def hook(_module, inputs, _output, s=stats[name]):
            x = inputs[0]
            s.add(tokens.select(x) if tokens is not None else x)
        handles.append(module.register_forward_hook(hook))
    return stats, handles
