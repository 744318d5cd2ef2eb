"""Per-layer connectivity: fan-in/fan-out of the kept connections, dead and isolated units."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.masks import get_mask
from ..core.layer_selection import DEFAULT_TYPES

__all__ = ["LayerConnectivity", "connectivity", "dead_units"]


@dataclass
class LayerConnectivity:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    fan_in: torch.Tensor  # [out] kept inputs per output unit (channel)
    fan_out: torch.Tensor  # [in] kept outputs per input unit (channel)

    @property
    def no_input(self) -> int:
        """Output units that no kept connection feeds (they output their bias only)."""
        return int((self.fan_in == 0).sum())

    @property
    def no_output(self) -> int:
        """Input units that feed no kept connection."""
        return int((self.fan_out == 0).sum())


def _kept(module: nn.Module) -> torch.Tensor:
    mask = get_mask(module)
    return (mask if mask is not None else module.weight.detach() != 0).bool()


def connectivity(model: nn.Module) -> list[LayerConnectivity]:
    """Fan-in and fan-out of every Linear/Conv layer; Conv counts connections per channel pair."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, DEFAULT_TYPES):
            continue
        kept = _kept(module)
        per_pair = kept.reshape(kept.shape[0], kept.shape[1], -1).any(dim=2)  # [out, in]
        rows.append(LayerConnectivity(name, tuple(kept.shape), 1 - kept.float().mean().item(),
                                      per_pair.sum(dim=1), per_pair.sum(dim=0)))
    return rows


def dead_units(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Hidden units of a layer chain that are cut off: no kept input, or no kept output downstream.

    Returns ``{layer: {"no_input": [...], "no_output": [...]}}`` where ``no_output`` lists the
    layer's output units that the next layer never reads (isolated). Assumes the Linear/Conv
    layers form a chain in registration order with matching sizes (MLPs, plain CNNs);
    where the sizes do not match the next layer, ``no_output`` is left empty.
    """
    layers = connectivity(model)
    out: dict[str, dict[str, list[int]]] = {}
    for i, layer in enumerate(layers):
        no_input = torch.nonzero(layer.fan_in == 0).flatten().tolist()
        no_output: list[int] = []
        if i + 1 < len(layers) and layers[i + 1].fan_out.numel() == layer.fan_in.numel():
            no_output = torch.nonzero(layers[i + 1].fan_out == 0).flatten().tolist()
        out[layer.name] = {"no_input": no_input, "no_output": no_output}
    return out
