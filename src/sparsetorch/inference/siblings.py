"""Linears fed the same input (an attention's q/k/v projections, a gated MLP's gate/up) as one kernel call.

At batch-1 decode every kernel call pays a fixed cost that a small layer does not amortize: the call from
Python, waking the threads, quantizing the input (int8 activations), and the first bytes of each weight stream
arriving from DRAM. On a 1B Llama (2 threads, 70%, int8 x int8) q_proj, k_proj and v_proj took 110 + 2 x 45 us
called one by one and 140 us as one 2560-row layer (one-off timings, recorded in issue #19's notes).
``fuse_siblings`` finds, by running the example, the bitmask (or, with activation sparsity, dense-column) layers
with one parent that are called one after another on the same tensor, packs their weights into one (outputs
concatenated), and lets the first of them called compute all: the others take their rows of that output. Each
keeps a view of its own rows of the combined weight (nothing is stored twice), so its ``layer`` still runs
alone. Dense columns gain twice: a zeroed input then skips one long column (q, k and v together) rather than
three shorter ones, the shortest of them (k, v of a grouped-query attention) too short to skip.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import SparsityWarning
from ..kernels.bitmask_weight import BitmaskWeight
from ..kernels.dense_columns import DenseColumnWeight
from ..tracing import hooked
from .kernel_choice import max_error
from .packed_modules import PackedLinear

__all__ = ["SiblingLinear", "fuse_siblings", "sibling_groups", "call_record", "recording_hook", "combinable",
           "concatenable", "combined_layer"]


def _version(x: torch.Tensor) -> int:
    """x's in-place version counter; -1 for tensors made under torch.inference_mode, which keep none."""
    return -1 if x.is_inference() else x._version


class SiblingGroup:
    """The combined layer, and the outputs computed for the current input that siblings have yet to take."""

    def __init__(self, fused: PackedLinear, bounds: list[int]):
        self.fused, self.bounds = fused, bounds
        self._input: torch.Tensor | None = None
        self._version = -1
        self._pending: list[torch.Tensor | None] = []

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # torch.compile traces this too (one kernel call in the graph) but cannot compare versions: there the
        # identity alone, which fuse_siblings saw hold with the version unchanged when it ran the example
        same = self._input is x and (torch.compiler.is_compiling() or self._version == _version(x))
        if same and self._pending[index] is not None:
            y, self._pending[index] = self._pending[index], None
            if all(p is None for p in self._pending):
                self._input, self._pending = None, []  # every sibling served: let go of the input
            return y
        y = self.fused(x)  # [..., sum of out_features]
        self._pending = [y[..., a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        self._input, self._version = x, (-1 if torch.compiler.is_compiling() else _version(x))
        mine, self._pending[index] = self._pending[index], None
        return mine


class SiblingLinear(nn.Module):
    """One Linear of a group fed the same input: its rows of the group's single kernel call (eager or traced by
    torch.compile). ``layer`` holds its own rows of the combined weight, to run alone."""

    def __init__(self, layer: PackedLinear, group: SiblingGroup, index: int):
        super().__init__()
        self.layer, self.index = layer, index
        self._group = group  # not a submodule: the combined weight's buffers are the layers' own (views)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index} of {len(self._group.bounds) - 1} siblings"


# the layouts whose weights concatenate by outputs into one kernel call, each output range a view
_COMBINABLE = (BitmaskWeight, DenseColumnWeight)


def combinable(mod: nn.Module | None) -> bool:
    """Whether ``mod`` can join a sibling group's call: a layout that concatenates, on its own kernel, with the
    group's thread count (the combined call runs with torch's)."""
    return (isinstance(mod, PackedLinear) and type(mod.packed) in _COMBINABLE and mod.kernel == mod.packed.format
            and mod.threads is None)


def concatenable(layers: list[PackedLinear]) -> bool:
    """Whether combinable ``layers`` concatenate into one weight (one layout, value type, ...)."""
    layout = type(layers[0].packed)
    return all(type(m.packed) is layout for m in layers) and layout.concatenable([m.packed for m in layers])


def combined_layer(layers: list[PackedLinear]) -> PackedLinear:
    """The outputs of concatenable ``layers`` as one layer (weights concatenated, biases zero-filled where absent)."""
    packed = type(layers[0].packed).concat([m.packed for m in layers])
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in layers]
    bias = None if all(m.bias is None for m in layers) else torch.cat(biases)
    return PackedLinear(layers[0].in_features, packed.out_features, bias, packed.format, packed)


def call_record(name: str, x: torch.Tensor) -> tuple[str, int, tuple]:
    """What ``sibling_groups`` compares of one call: the layer, its input's identity, and the input's storage,
    shape and version (the same tensor, unchanged in between)."""
    return name, id(x), (x.data_ptr(), tuple(x.shape), _version(x))


def recording_hook(calls: list[tuple[str, int, tuple]], name: str):
    """A forward pre-hook that appends each call's ``call_record`` to ``calls``."""
    def hook(m, inp) -> None:
        calls.append(call_record(name, inp[0]))
    return hook


def _call_order(model: nn.Module, args: tuple) -> tuple[list[tuple[str, int, tuple]], object]:
    """``call_record`` of every bitmask PackedLinear call while the example runs, and the model's output."""
    calls: list[tuple[str, int, tuple]] = []
    hooks = (mod.register_forward_pre_hook(recording_hook(calls, name)) for name, mod in model.named_modules()
             if combinable(mod))
    with hooked(hooks), torch.no_grad():
        out = model(*args)
    return calls, out


def sibling_groups(calls: list[tuple[str, int, tuple]]) -> list[list[str]]:
    """Runs of consecutive calls (``call_record``) of one parent's children on the same tensor, each layer
    called once."""
    once = {name for name, *_ in calls if sum(c[0] == name for c in calls) == 1}
    groups: list[list[str]] = []
    for (name, ident, key), prev in zip(calls, [None, *calls[:-1]]):
        parent = name.rpartition(".")[0]
        joins = (prev is not None and groups and prev[0] == groups[-1][-1] and prev[1:] == (ident, key)
                 and prev[0].rpartition(".")[0] == parent and name in once)
        if joins:
            groups[-1].append(name)
        elif name in once:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def fuse_siblings(model: nn.Module, args: tuple, plan: list[dict],
                  apart: dict[str, tuple[nn.Module, str]] | None = None) -> nn.Module:
    """Replace each group of bitmask (or dense-column) layers fed the same input by SiblingLinears sharing one
    kernel call, if the model then reproduces its output on the example (else, with a warning, each layer goes
    back to its own choice: ``apart[name]`` = (layer, kernel) where it was moved to a layout for the shared
    call, else as it was); a plan row per group."""
    calls, before = _call_order(model, args)
    mods = dict(model.named_modules())
    groups = [g for g in sibling_groups(calls) if concatenable([mods[n] for n in g])]
    if not groups:
        return model
    originals = {}
    for names in groups:
        layers = [model.get_submodule(n) for n in names]
        fused = combined_layer(layers)
        fused_weight, kernel = fused.packed, fused.kernel
        bounds = [0]
        for m in layers:
            bounds.append(bounds[-1] + m.out_features)
        group = SiblingGroup(fused, bounds)
        for i, (name, m) in enumerate(zip(names, layers)):
            originals[name] = m
            alone = PackedLinear(m.in_features, m.out_features, m.bias, kernel,
                                 fused_weight.rows(bounds[i], bounds[i + 1]))
            model.set_submodule(name, SiblingLinear(alone, group, i))
        plan.append({"layer": "+".join(names), "type": "SiblingLinear", "shape": [bounds[-1], layers[0].in_features],
                     "kernel": f"{kernel} (one call)", "members": names, "ms": {}, "skipped": {}})
    try:
        with torch.no_grad():
            err = max_error(model(*args), before)
    except (RuntimeError, ValueError, TypeError) as exc:  # a caller reshaping the outputs in a way views refuse
        err = repr(exc)
    if err:
        rows = {row["layer"]: row for row in plan}
        for name, m in originals.items():
            layer, kernel = (apart or {}).get(name, (m, None))
            model.set_submodule(name, layer)
            if kernel is not None and name in rows:
                rows[name]["kernel"] = kernel
        del plan[-len(groups):]
        warnings.warn(f"Linears fed the same input left as separate calls: the model with them combined did not "
                      f"reproduce its output ({err})", SparsityWarning, stacklevel=3)
    return model
