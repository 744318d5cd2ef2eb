"""Mixture-of-experts layers whose experts are fused 3-D parameters, pruned one expert at a time.

transformers 5.x stores a layer's experts as one module (``MixtralExperts``, ``Qwen2MoeExperts``,
``Qwen3MoeExperts``...) with ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (or transposed,
``[E, in, out]``), called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``
by the MoE block after its router. Such a module is recognised by that structure, not by its class:

* each expert ``e`` of each fused parameter becomes a target of its own, an ``ExpertSlice``: an
  ``[out, in]`` Linear view of ``param[e]`` named like ``model.layers.0.mlp.experts.gate_up_proj[3]``,
  so include/exclude globs (``exclude="*experts*"``), per-name sparsities, OWL and the ``LayerPruner``
  treat it like any Linear layer;
* its input statistics come from exactly the tokens the router sent to it (real tokens only, padding
  left out): the routed hidden states for ``gate_up_proj``, and ``act(gate) * up`` recomputed from them
  with the module's own gating for ``down_proj``; an expert no token reaches is pruned by magnitude
  and reported like any layer without data;
* after the pruner has handled a block, the experts' keep-masks are installed as one mask on the whole
  3-D parameter (``set_mask(experts, mask3d, name="gate_up_proj")``), which keeps them zero in training.

Routers stay dense: a router module (``MixtralTopKRouter``) is not Linear, and the Linear children of an
MoE block that score its experts (an old-style ``gate`` Linear, a shared-expert gate) are left out by
default. Per-expert ``nn.Linear`` experts (older transformers) and shared experts are ordinary layers.
An experts-like module whose layout is not understood raises a ``SparsityError`` naming its class.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer_selection import matches_spec
from ..core.masks import get_mask, remove_mask, set_mask
from ..errors import SparsityError
from .linear_layers import InputStats, TokenMask, attach_stats, is_linear_like, weight_2d

__all__ = ["FusedExperts", "ExpertSlice", "fused_experts", "prunable_layers", "router_names", "layer_matches",
           "check_experts_understood", "layer_module", "attach_layer_stats", "install_expert_masks"]

_UP_NAMES = ("gate_up_proj", "up_proj")
_DOWN_NAME = "down_proj"


@dataclass(frozen=True)
class FusedExperts:
    """One fused-experts module and how it computes expert ``e`` on its routed tokens ``x [n, H]``:
    ``down(gate(x @ up[e]^T + up_bias[e]))`` with ``[E, out, in]`` weights (``transposed``: ``[E, in, out]``)."""

    module: nn.Module
    up: str  # "gate_up_proj" (gated: act(gate) * up) or "up_proj" (act(up))
    down: str
    num_experts: int
    transposed: bool
    gated: bool

    def params(self) -> tuple[str, str]:
        return self.up, self.down

    def linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w = getattr(self.module, name)[e]
        y = x @ w if self.transposed else F.linear(x, w)
        bias = getattr(self.module, f"{name}_bias", None)
        return y if bias is None else y + bias[e]

    def down_input(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """What expert ``e``'s down projection sees for routed tokens ``x``: the module's own gating."""
        h = self.linear(x.to(getattr(self.module, self.up).dtype), self.up, e)
        apply_gate = getattr(self.module, "_apply_gate", None)  # transformers' per-class gating (gpt-oss clamps)
        if self.gated and callable(apply_gate):
            return apply_gate(h)
        act = self.module.act_fn
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)


def _three_d(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _looks_like_experts(module: nn.Module) -> bool:
    """3-D parameters sharing a leading (expert) dimension, one next to a ``num_experts`` attribute, or
    (the one test by name) a class called ``*Expert*`` holding its weights itself rather than in Linears."""
    if is_linear_like(module):
        return False
    params = _three_d(module)
    if len(params) >= 2 and len({p.shape[0] for p in params.values()}) == 1:
        return True
    if params and hasattr(module, "num_experts"):
        return True
    return "expert" in type(module).__name__.lower() and next(module.parameters(recurse=False), None) is not None


def _routed_positions(module: nn.Module) -> list[str] | None:
    """The names of forward's first three parameters (hidden states, top-k indices, top-k weights)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [n for n, p in sig.parameters.items() if p.kind in kinds]
    return names[:3] if len(names) >= 3 else None


def fused_experts(module: nn.Module, name: str = "") -> FusedExperts | None:
    """The layout of ``module`` if it is a fused-experts module, None if it is not one.

    Raises ``SparsityError`` for a module that looks like experts (3-D parameters with a leading expert
    dimension) but whose layout or call is not understood."""
    if not _looks_like_experts(module):
        return None
    params = _three_d(module)
    up = next((n for n in _UP_NAMES if n in params), None)
    gated = up == "gate_up_proj" and getattr(module, "has_gate", True) is not False
    transposed, problem = None, None
    if up is None or _DOWN_NAME not in params:
        found = sorted(n for n, _ in module.named_parameters(recurse=False))
        problem = f"expected 3-D parameters 'gate_up_proj' (or 'up_proj') and 'down_proj', got {found}"
    elif params[up].shape[0] != params[_DOWN_NAME].shape[0]:
        problem = f"{up} and {_DOWN_NAME} hold different numbers of experts"
    elif _routed_positions(module) is None:
        problem = "its forward does not take (hidden_states, top_k_index, top_k_weights)"
    elif not callable(getattr(module, "act_fn", None)) and not (gated and callable(getattr(module, "_apply_gate", None))):
        problem = "it has no act_fn (or _apply_gate) to recompute what its down projection sees"
    else:
        transposed = _transposed(module, params[up], params[_DOWN_NAME], gated)
        if transposed is None:
            problem = (f"the shapes {tuple(params[up].shape)} ({up}) and {tuple(params[_DOWN_NAME].shape)} "
                       f"({_DOWN_NAME}) are neither [E, out, in] nor [E, in, out]")
    if problem is not None:
        where = f"{name} ({type(module).__name__})" if name else type(module).__name__
        raise SparsityError(f"{where} looks like a mixture-of-experts layer but its layout is not understood: "
                            f"{problem}. Leave it dense with exclude=['{name or '...'}*'] to prune the rest",
                            layer=name, module=type(module).__name__)
    return FusedExperts(module, up, _DOWN_NAME, int(params[up].shape[0]), transposed, gated)


def _transposed(module: nn.Module, up: torch.Tensor, down: torch.Tensor, gated: bool) -> bool | None:
    """Whether the weights are stored ``[E, in, out]``: transformers' ``is_transposed`` when the class
    sets it, else from the shapes (unambiguous for gated experts, whose up projection is twice as wide)."""
    factor = 2 if gated else 1
    plain = up.shape[2] == down.shape[1] and up.shape[1] == factor * down.shape[2]  # [E, 2I, H], [E, H, I]
    flipped = up.shape[1] == down.shape[2] and up.shape[2] == factor * down.shape[1]  # [E, H, 2I], [E, I, H]
    declared = getattr(module, "is_transposed", None)
    if isinstance(declared, bool):
        return declared if (flipped if declared else plain) else None
    return False if plain else True if flipped else None


class ExpertSlice(nn.Linear):
    """Expert ``index`` of a fused 3-D parameter as an ``[out, in]`` Linear layer for the pruner.

    Never called and not part of the model: ``weight`` is a view of ``param[index]`` (transposed when
    the experts store ``[in, out]``), resolved at each access so that it follows the parameter across
    ``.to()``; writing it writes the expert. The mask the pruner sets on it is moved onto the 3-D
    parameter by ``install_expert_masks``."""

    def __init__(self, experts: FusedExperts, param: str, index: int) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "experts", experts)  # a plain reference, not a submodule
        self.param_name, self.index = param, index
        self.out_features, self.in_features = self.weight.shape
        self.bias = None

    @property
    def owner(self) -> nn.Module:
        return self.experts.module

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        w = getattr(self.owner, self.param_name).detach()[self.index]
        return nn.Parameter(w.t() if self.experts.transposed else w)  # shares the storage; set_mask hooks it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def layer_module(layer: nn.Module) -> nn.Module:
    """The model's module that computes ``layer``: the experts module for an expert slice, else itself."""
    return layer.owner if isinstance(layer, ExpertSlice) else layer


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear-like layers and the experts of fused MoE layers (one ``ExpertSlice`` per expert and
    parameter), in module order. Experts-like modules that are not understood are skipped here and
    reported by ``check_experts_understood``."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_linear_like(module):
            out.append((name, module))
            continue
        try:
            layout = fused_experts(module, name)
        except SparsityError:
            continue
        if layout is not None:
            for param in layout.params():
                out += [(f"{name}.{param}[{e}]", ExpertSlice(layout, param, e)) for e in range(layout.num_experts)]
    return out


def layer_matches(name: str, layer: nn.Module, specs: Iterable[type | str]) -> bool:
    """``matches_spec`` for prunable layers: an expert slice also matches its experts module's type
    (``exclude=[MixtralExperts]``) and globs naming the module (``"*.mlp.experts"``)."""
    specs = list(specs)
    if matches_spec(name, layer, specs):
        return True
    if isinstance(layer, ExpertSlice):
        owner_name = name.rsplit(".", 1)[0]
        return matches_spec(owner_name, layer.owner, specs)
    return False


def check_experts_understood(model: nn.Module, includes: list, excludes: list) -> None:
    """Raise ``SparsityError`` for an experts-like module whose layout is not understood, unless the
    selection leaves it out (not in ``include``, or in ``exclude``)."""
    for name, module in model.named_modules():
        if is_linear_like(module):
            continue
        try:
            fused_experts(module, name)
        except SparsityError:
            names = [name] + [f"{name}.{p}[0]" for p in _three_d(module)]
            wanted = not includes or any(matches_spec(n, module, includes) for n in names)
            if wanted and not any(matches_spec(n, module, excludes) for n in names):
                raise


def _expert_count(module: nn.Module) -> int | None:
    """How many experts ``module`` holds: a fused-experts module, or a ModuleList of >= 2 same-class MLPs
    (modules whose parameterised parts are all Linear-like: per-expert Linears of older transformers)."""
    try:
        layout = fused_experts(module)
    except SparsityError:
        layout = None
    if layout is not None:
        return layout.num_experts
    if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(c) for c in module}) == 1:
        parts = [m for m in module[0].modules() if next(m.parameters(recurse=False), None) is not None]
        if parts and all(is_linear_like(m) for m in parts):
            return len(module)
    return None


def router_names(model: nn.Module) -> set[str]:
    """Linear-like layers that route tokens, kept dense by default: the direct Linear children of an MoE
    block (a module holding experts and a router whose 2-D weight has one row per expert) with one
    output per expert (the router itself, in older layouts) or a single output (a shared-expert gate)."""
    found: set[str] = set()
    for name, module in model.named_modules():
        children = list(module.named_children())
        counts = [c for c in (_expert_count(m) for _, m in children) if c]
        if not counts:
            continue
        experts = counts[0]
        if not any(_scores_experts(m, experts) for _, m in children):
            continue
        for child_name, child in children:
            if is_linear_like(child) and weight_2d(child).shape[0] in (experts, 1):
                found.add(f"{name}.{child_name}" if name else child_name)
    return found


def _scores_experts(module: nn.Module, experts: int) -> bool:
    """A router: a 2-D weight with one output row per expert (a Linear, or a router module's ``weight``)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    return (weight_2d(module) if is_linear_like(module) else w).shape[0] == experts


def attach_layer_stats(layers: dict[str, nn.Module], device: torch.device, hessian: bool,
                       tokens: TokenMask | None = None):
    """``attach_stats`` for prunable layers: hooks on ordinary layers, and one hook per fused-experts
    module feeding each targeted expert slice the tokens routed to it. Returns (stats, handles)."""
    plain = {n: m for n, m in layers.items() if not isinstance(m, ExpertSlice)}
    stats, handles = attach_stats(plain, device, hessian, tokens)
    groups: dict[int, tuple[FusedExperts, dict[tuple[str, int], InputStats]]] = {}
    for name, layer in layers.items():
        if isinstance(layer, ExpertSlice):
            stats[name] = InputStats(layer.in_features, device, hessian)
            groups.setdefault(id(layer.owner), (layer.experts, {}))[1][(layer.param_name, layer.index)] = stats[name]
    for layout, wanted in groups.values():
        handles.append(layout.module.register_forward_pre_hook(_routed_stats_hook(layout, wanted, tokens),
                                                               with_kwargs=True))
    return stats, handles


def _routed_stats_hook(layout: FusedExperts, wanted: dict[tuple[str, int], InputStats], tokens: TokenMask | None):
    names = _routed_positions(layout.module)
    sig = inspect.signature(layout.module.forward)
    experts = sorted({e for _, e in wanted})

    def hook(_module, args, kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        hidden, index = bound.get(names[0]), bound.get(names[1])
        if not isinstance(hidden, torch.Tensor) or not isinstance(index, torch.Tensor):
            raise SparsityError(f"{type(layout.module).__name__} was called without hidden states and top-k "
                                f"expert indices as its {names[:2]} arguments")
        x = hidden.detach().reshape(-1, hidden.shape[-1])  # [tokens, H]
        routed = index.reshape(x.shape[0], -1)  # [tokens, k]
        real = tokens.rows(x.shape[0]) if tokens is not None else None  # padded tokens are left out
        with torch.no_grad():
            for e in experts:
                rows = (routed == e).any(dim=-1)
                if real is not None:
                    rows &= real.to(rows.device)
                xe = x[rows]  # the tokens routed to expert e
                up, down = wanted.get((layout.up, e)), wanted.get((layout.down, e))
                if up is not None:
                    up.add(xe)
                if down is not None and xe.shape[0]:
                    down.add(layout.down_input(xe, e))

    return hook


def install_expert_masks(layers: dict[str, nn.Module]) -> None:
    """Move the keep-masks the pruner left on expert slices onto their 3-D parameters: one mask per
    parameter, experts not pruned here keeping their current mask (or staying dense)."""
    groups: dict[tuple[int, str], list[ExpertSlice]] = {}
    for layer in layers.values():
        if isinstance(layer, ExpertSlice) and get_mask(layer) is not None:
            groups.setdefault((id(layer.owner), layer.param_name), []).append(layer)
    for slices in groups.values():
        owner, name = slices[0].owner, slices[0].param_name
        param = getattr(owner, name)
        current = get_mask(owner, name)
        mask = current.clone() if current is not None else torch.ones(param.shape, dtype=torch.bool, device=param.device)
        for s in slices:
            keep = get_mask(s).to(mask.device)
            mask[s.index] = keep.t() if s.experts.transposed else keep
            remove_mask(s)
        set_mask(owner, mask, name=name)
