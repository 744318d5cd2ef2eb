"""Dependency groups: sets of channels that must be removed together or not at all.

A *group* is one channel space of size ``size``: the output channels of a layer, unioned with
every other layer's channels that are added or multiplied to them (residuals), plus the layers
that read those channels. Each *member* says how the group's units map onto one layer's
parameter dimension: unit ``u`` covers indices ``offset + u * inner + [0, inner)`` (``inner`` > 1
for attention heads, or for conv channels flattened into a Linear's inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Member", "Group", "adapter_for", "HEAD_ATTRS"]


@dataclass
class Member:
    """One layer touched by a group.

    role: "out" (the layer produces these channels: weight rows), "follow" (per-channel
    parameters that pass the channel on: BatchNorm, depthwise conv), "in" (the layer reads
    the channels: weight columns; removed constants fold into its bias).
    decides: for "out" members, whether its zero rows make a unit removable (attention
    queries/keys do not: a head with zero queries still averages its values).
    """

    module: str
    role: str
    offset: int = 0
    inner: int = 1
    decides: bool = True

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Parameter indices covered by ``units`` (1-D long)."""
        return (self.offset + units[:, None] * self.inner + torch.arange(self.inner)).flatten()


@dataclass(eq=False)
class Group:
    size: int
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # why these channels cannot be removed
    zero_rule: str = "all"  # a unit is removable when "all" / "any" deciding producers are zero
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, value per unit)
    parent: "Group | None" = None

    def find(self) -> "Group":
        g = self
        while g.parent is not None:
            g = g.parent
        return g

    def union(self, other: "Group", reason: str) -> "Group":
        a, b = self.find(), other.find()
        if a is b:
            return a
        if a.size != b.size:  # cannot happen for shape-correct graphs; stay safe
            a.blocked.append(reason)
            b.blocked.append(reason)
            return a
        a.members += b.members
        a.blocked += b.blocked
        a.attrs += b.attrs
        b.members, b.blocked, b.attrs, b.parent = [], [], [], a
        return a

    def block(self, reason: str) -> None:
        root = self.find()
        if reason not in root.blocked:
            root.blocked.append(reason)

    @property
    def name(self) -> str:
        """The first producing layer, for messages."""
        outs = [m.module for m in self.members if m.role == "out"]
        return outs[0] if outs else (self.members[0].module if self.members else "?")

    def layers(self, role: str | None = None) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            if role is None or m.role == role:
                seen.setdefault(m.module)
        return list(seen)


# attention modules whose head count is stored as attributes (updated after removing heads)
# "Attention": sparsetorch.models.gpt's (its head count; the head size follows from qkv's width)
HEAD_ATTRS: dict[str, tuple[str, ...]] = {"GPT2Attention": ("num_heads", "split_size"), "Attention": ("heads",)}


class Adapter:
    """How a module type's parameters map onto roles: ``dims[role] = [(param, dim), ...]``."""

    dims: dict[str, list[tuple[str, int]]] = {}
    size_attrs: tuple[str, ...] = ()

    def fix_sizes(self, module: nn.Module) -> None:
        """Update shape attributes (in_features, ...) from the resized parameters."""

    def fold(self, module: nn.Module, idx: torch.Tensor, value: torch.Tensor) -> None:
        """Add the contribution of constant inputs ``value`` at input indices ``idx`` to the bias."""
        raise NotImplementedError


def _ensure_bias(module: nn.Module, size: int, like: torch.Tensor) -> torch.Tensor:
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(size, dtype=like.dtype, device=like.device))
    return module.bias


class LinearAdapter(Adapter):
    dims = {"out": [("weight", 0), ("bias", 0)], "in": [("weight", 1)]}
    size_attrs = ("in_features", "out_features")

    def fix_sizes(self, m):
        m.out_features, m.in_features = m.weight.shape

    @torch.no_grad()
    def fold(self, m, idx, value):  # y = W x + b, x[idx] = value constant
        bias = _ensure_bias(m, m.weight.shape[0], m.weight)
        bias += m.weight[:, idx] @ value.to(m.weight.dtype)


class HFConv1DAdapter(Adapter):
    """transformers' Conv1D (GPT-2): weight is [in, out]."""

    dims = {"out": [("weight", 1), ("bias", 0)], "in": [("weight", 0)]}
    size_attrs = ("nf", "nx")

    def fix_sizes(self, m):
        m.nx, m.nf = m.weight.shape

    @torch.no_grad()
    def fold(self, m, idx, value):
        bias = _ensure_bias(m, m.weight.shape[1], m.weight)
        bias += value.to(m.weight.dtype) @ m.weight[idx, :]


class ConvAdapter(Adapter):
    dims = {"out": [("weight", 0), ("bias", 0)], "in": [("weight", 1)], "follow": [("weight", 0), ("bias", 0)]}
    size_attrs = ("in_channels", "out_channels", "groups")

    def fix_sizes(self, m):
        if m.groups > 1:  # depthwise: one filter per channel
            m.in_channels = m.out_channels = m.groups = m.weight.shape[0]
        else:
            m.out_channels, m.in_channels = m.weight.shape[:2]

    @torch.no_grad()
    def fold(self, m, idx, value):  # a constant input channel adds c * sum(kernel) everywhere (no zero padding)
        bias = _ensure_bias(m, m.weight.shape[0], m.weight)
        bias += (m.weight[:, idx].flatten(2).sum(2) * value.to(m.weight.dtype)).sum(1)


class NormAdapter(Adapter):
    dims = {"follow": [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]}
    size_attrs = ("num_features",)

    def fix_sizes(self, m):
        m.num_features = (m.running_mean if m.running_mean is not None else m.weight).shape[0]


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def adapter_for(module: nn.Module) -> Adapter | None:
    if isinstance(module, nn.Linear):
        return LinearAdapter()
    if isinstance(module, _CONV):
        return ConvAdapter()
    if isinstance(module, _BN):
        return NormAdapter()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return HFConv1DAdapter()
    return None


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups == 1
