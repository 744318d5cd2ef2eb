"""The "absolute network": weights replaced by |W| * mask, biases by zero, BatchNorm by identity.

For a ReLU network with Linear/Conv/average-pool layers its output on an all-ones input sums,
over every input-to-output path, the product of |w| along the path (Tanaka et al. 2020,
SynFlow): with non-negative weights, inputs and no bias every pre-activation is >= 0, so each
ReLU is the identity and the network is the linear map prod_l |W_l|. Gradients of that sum give
per-input and per-connection path flows, computed with the layers' own (sparse) products.
"""
from __future__ import annotations

import copy
import torch
from torch import nn

from ..core.masks import get_mask

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def abs_network(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with |W| * mask weights, zero biases and norms made identity."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, module in list(net.named_modules()):
            if isinstance(module, _NORMS):
                net.set_submodule(name, nn.Identity())
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                mask = get_mask(module)
                weight.copy_(weight.abs() * (mask if mask is not None else 1))
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.zero_()
    for p in net.parameters():
        p.requires_grad_(True)
    return net
