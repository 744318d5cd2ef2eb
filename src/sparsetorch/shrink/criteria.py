"""Importance of each unit (channel, neuron, head) of a dependency group; higher = keep.

Pure functions over the group's parameters. Scores are per-parameter averages so that units of
different layers can be ranked together (global scope).
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import Group, adapter_for

__all__ = ["CRITERIA", "unit_scores"]

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def _rows(module: nn.Module, role: str, pname: str, dim: int, member, size: int) -> torch.Tensor | None:
    """[size, elements per unit] view of one parameter's slices for the group's units."""
    t = getattr(module, pname, None)
    if t is None:
        return None
    idx = member.indices(torch.arange(size))
    sel = t.detach().float().index_select(dim, idx.to(t.device)).movedim(dim, 0).cpu()
    return sel.reshape(size, member.inner, -1).reshape(size, -1)


def unit_scores(group: Group, modules: dict[str, nn.Module], criterion: str,
                grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """[size] scores, or None when the criterion does not apply (bn_scale without BatchNorm)."""
    size = group.size
    if criterion in ("l1", "l2"):
        # Li et al. 2017, "Pruning filters for efficient ConvNets": filter norms
        parts = [_rows(modules[m.module], "out", *adapter_for(modules[m.module]).dims["out"][0], m, size)
                 for m in group.members if m.role == "out"]
        w = torch.cat([p for p in parts if p is not None], dim=1)
        return w.abs().mean(1) if criterion == "l1" else w.pow(2).mean(1).sqrt()
    if criterion == "bn_scale":
        # Liu et al. 2017, "Learning efficient convolutional networks through network slimming": |gamma|
        gammas = [_rows(modules[m.module], "follow", "weight", 0, m, size) for m in group.members
                  if m.role == "follow" and isinstance(modules[m.module], nn.modules.batchnorm._BatchNorm)]
        gammas = [g for g in gammas if g is not None]
        return torch.cat(gammas, 1).abs().mean(1) if gammas else None
    # taylor -- Molchanov et al. 2019, "Importance estimation for neural network pruning":
    # (sum over the unit's parameters of g * w)^2, the first-order loss change of removing it
    total = torch.zeros(size)
    for m in group.members:
        if m.role == "in":
            continue
        module = modules[m.module]
        for pname, dim in adapter_for(module).dims.get(m.role, []):
            p = getattr(module, pname, None)
            if not isinstance(p, nn.Parameter) or id(p) not in grads:
                continue
            gw = (grads[id(p)].float() * p.detach().float())
            idx = m.indices(torch.arange(size)).to(p.device)
            total += gw.index_select(dim, idx).movedim(dim, 0).reshape(size, -1).sum(1).cpu()
    score = total.pow(2)
    return score / score.mean().clamp_min(1e-30)  # comparable across groups
