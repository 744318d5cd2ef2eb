"""One layout for Linears fed the same input, chosen for the call they will share.

``to_inference`` times each layer's candidates alone, and ``fuse_siblings`` then combines siblings (q/k/v,
gate/up) into one kernel call only where their packed weights concatenate: the same kernel, value type and
mask-or-none. Timed alone, siblings of one shape and density can pick different layouts (bitmask int8 for
q_proj, dense int8 for k_proj: within noise of each other on a CPU without AVX-512) and so lose the shared
call, which at decode saves more than the difference. Here, once every sibling is timed, the layouts all of
them offer are timed as the one combined call, against the siblings run apart on their own choices, and the
faster wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernel_choice import KERNEL_CACHE, time_candidates
from .packed_modules import PackedLinear
from .siblings import combinable, combined_layer, concatenable

__all__ = ["Sibling", "shared_layout"]


@dataclass
class Sibling:
    """One converted member of a group: the layer it runs alone, and its candidates that could join a shared call
    (built, checked against the layer's dense output; the other candidates are not kept)."""
    name: str
    chosen: nn.Module  # a PackedLinear, or the torch layer kept
    options: dict[str, PackedLinear]
    key: tuple  # its kernel-choice key (shape, density, pattern, values, ...)


def shared_layout(siblings: list[Sibling], x: torch.Tensor, budget_s: float,
                  cold: bool) -> tuple[str | None, dict[str, nn.Module], dict[str, float]]:
    """(layout, the siblings' layers in it, seconds per call of each timed option), or (None, {}, times) where
    the siblings run apart faster, already share a layout, or have none in common. ``x``: their input."""
    chosen = [s.chosen for s in siblings]
    if all(combinable(m) for m in chosen) and concatenable(chosen):
        return None, {}, {}  # fuse_siblings combines them as chosen
    options = {name: [s.options[name] for s in siblings] for name in siblings[0].options
               if all(name in s.options for s in siblings)}
    options = {name: layers for name, layers in options.items() if concatenable(layers)}
    if not options:
        return None, {}, {}
    key = ("siblings", *(s.key for s in siblings))
    times: dict[str, float] = {}
    if key not in KERNEL_CACHE:  # cached like every choice: one process converts alike
        # each option as the layer fuse_siblings will build
        fns = {name: (lambda m=combined_layer(layers): m(x)) for name, layers in options.items()}
        fns["apart"] = lambda: [m(x) for m in chosen]
        with torch.no_grad():
            times = time_candidates(fns, budget_s, False, cold)
        KERNEL_CACHE[key] = min(times, key=lambda k: times[k])
    best = KERNEL_CACHE[key]
    if best not in options:
        return None, {}, times
    return best, {s.name: m for s, m in zip(siblings, options[best])}, times
