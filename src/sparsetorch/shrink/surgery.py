"""``sparsetorch.shrink``: physically remove pruned channels, filters, neurons and heads."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import SparsityError, SparsityWarning
from ..tracing import hooked
from .groups import Group, Member, adapter_for
from .transformer_heads import hf_groups, is_hf_model, update_config
from .channel_graph import TraceFailed, trace_groups

__all__ = ["shrink", "find_groups", "as_args", "run_model"]


def as_args(example_inputs: object) -> tuple:
    if example_inputs is None:
        raise SparsityError("example_inputs is required: a tensor or tuple of tensors the model accepts")
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@torch.no_grad()
def run_model(model: nn.Module, args: tuple) -> object:
    try:
        return model(*args)
    except Exception as exc:
        raise SparsityError(
            f"the model failed on example_inputs ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass inputs shaped like real ones, e.g. torch.randn(1, 3, 32, 32) for an image model",
        ) from None


def find_groups(model: nn.Module, example_inputs: object) -> list[Group]:
    """Dependency groups of ``model`` (fx tracing, or by name for GPT-2/Llama), blocked ones included."""
    args = as_args(example_inputs)
    if is_hf_model(model):
        groups, notes = hf_groups(model)
        for note in notes:
            warnings.warn(note, SparsityWarning, stacklevel=3)
        return groups
    return trace_groups(model, args)


def shrink(model: nn.Module, example_inputs: object, *, check: bool = True) -> nn.Module:
    """A smaller dense copy of ``model`` without its pruned output channels, neurons and heads.

    A channel goes when every layer producing it has an all-zero weight row there (e.g. after
    ``sparsetorch.prune(model, 0.5, pattern="channel")`` or ``sparsetorch.shrink.prune_channels``).
    Dependencies are followed by tracing with torch.fx: residual additions remove a channel from
    all their branches or from none; BatchNorm and depthwise convolutions follow their producer;
    Linear/Conv layers reading the channel lose those inputs. A removed channel that still carries
    a constant (a bias, a BatchNorm shift) is folded into the reading layer's bias, or kept where
    that cannot be exact (a zero-padded convolution). Transformers GPT-2 and Llama models lose
    attention heads and MLP units (their ``config`` and head counts are updated).

    The input model is not changed; masks are not carried over (the zeros stay in the weights).
    Layers that cannot be shrunk are named in a ``SparsityWarning`` and left as they were.
    With ``check`` the copy's outputs are compared to the masked model's on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    was_training = model.training
    small = copy.deepcopy(model)
    _drop_masks(small)
    small.eval()
    reference = run_model(small, args)
    try:
        groups = find_groups(small, args)
    except TraceFailed as exc:
        warnings.warn(f"shrink left {type(model).__name__} as it was: {exc}", SparsityWarning, stacklevel=2)
        return small.train(was_training)
    modules = dict(small.named_modules())
    plan = {}
    for g in groups:
        units = _removable(g, modules)
        if units.numel():
            plan[id(g)] = (g, units)
    _warn_unowned_zero_rows(groups, modules)
    inputs = _capture_inputs(small, args, {m.module for g, _ in plan.values() for m in g.members if m.role == "in"})
    folds = []
    for key, (g, units) in list(plan.items()):
        units, group_folds = _foldable(g, units, modules, inputs)
        if units.numel() == g.size:  # keep one unit: layers with no channels break most code
            units = units[1:]
        if units.numel():
            plan[key] = (g, units)
            folds += group_folds(units)
        else:
            del plan[key]
    _apply(small, modules, [p for p in plan.values()], folds)
    update_config(small)
    if check:
        _check_outputs(reference, run_model(small, args))
    return small.train(was_training)


def _drop_masks(model: nn.Module) -> None:
    from ..core.masks import apply_masks, iter_masks

    apply_masks(model)
    for item in list(iter_masks(model)):
        item.module._buffers.pop(item.name + "_mask", None)


def _out_rows(module: nn.Module, member: Member, with_bias: bool) -> torch.Tensor:
    """[size, inner] bool: which of the member's output indices are all-zero rows."""
    pname, dim = adapter_for(module).dims["out"][0]
    w = getattr(module, pname).detach()
    zero = (w.movedim(dim, 0).reshape(w.shape[dim], -1) == 0).all(1)
    if with_bias and getattr(module, "bias", None) is not None:
        zero &= module.bias.detach() == 0
    return zero


def _removable(g: Group, modules: dict[str, nn.Module]) -> torch.Tensor:
    """Units of ``g`` whose deciding producers are all zero (warns if the group is blocked)."""
    deciders = [m for m in g.members if m.role == "out" and m.decides]
    if not deciders:
        return torch.zeros(0, dtype=torch.long)
    units = torch.arange(g.size)
    per = []
    for m in deciders:
        zero = _out_rows(modules[m.module], m, with_bias=g.zero_rule == "any")
        per.append(zero.cpu()[m.indices(units)].reshape(g.size, m.inner).all(1))
    stacked = torch.stack(per)
    removable = stacked.all(0) if g.zero_rule == "all" else stacked.any(0)
    found = removable.nonzero().flatten()
    if found.numel() and g.blocked:
        warnings.warn(
            f"kept {found.numel()} zero channel(s) of {', '.join(g.layers('out'))}: {'; '.join(g.blocked)}",
            SparsityWarning, stacklevel=3,
        )
        return torch.zeros(0, dtype=torch.long)
    return found


def _warn_unowned_zero_rows(groups: list[Group], modules: dict[str, nn.Module]) -> None:
    owned = {m.module for g in groups for m in g.members if m.role in ("out", "follow")}
    for name, module in modules.items():
        adapter = adapter_for(module)
        if name in owned or adapter is None or "out" not in adapter.dims:
            continue
        if _out_rows(module, Member(name, "out"), with_bias=False).any():
            warnings.warn(
                f"zero output rows of {name} were not removed: it is in no removable channel group (for "
                "transformers only attention heads and MLP units are removed; the hidden size is shared by all layers)",
                SparsityWarning, stacklevel=3,
            )


def _capture_inputs(model: nn.Module, args: tuple, names: set[str]) -> dict[str, list[torch.Tensor]]:
    """The first input of every named module on one run of the model."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with hooked(m.register_forward_pre_hook(lambda mod, inp, n=n: seen[n].append(inp[0].detach().clone()))
                for n, m in model.named_modules() if n in names):
        run_model(model, args)
    return seen


def _unit_values(module: nn.Module, x: torch.Tensor, member: Member, units: torch.Tensor) -> torch.Tensor:
    """[positions, units, inner] values of the units' input features at every position."""
    idx = member.indices(units).to(x.device)
    if isinstance(module, nn.modules.conv._ConvNd):  # channels on dim 1
        v = x.index_select(1, idx).movedim(1, -1)
    else:
        v = x.index_select(-1, idx)
    return v.reshape(-1, units.numel(), member.inner).float()


def _foldable(g: Group, units: torch.Tensor, modules, inputs):
    """Drop units whose constant value a consumer cannot absorb; return (units, fold maker)."""
    keep = torch.ones(units.numel(), dtype=torch.bool)
    reasons = []
    for m in g.members:
        if m.role != "in":
            continue
        module, calls = modules[m.module], inputs.get(m.module, [])
        if not calls:
            keep[:] = False
            reasons.append(f"{m.module} did not run on example_inputs")
            continue
        for x in calls:
            v = _unit_values(module, x, m, units)
            zero = (v == 0).all(2).all(0)
            tol = 1e-5 * max(1.0, float(v.abs().max())) if v.numel() else 0.0
            const = ((v - v[:1]).abs() <= tol).all(2).all(0)
            ok = zero | (const & _absorbs(module) & (len(calls) == 1))
            if not ok.all():
                reasons.append(f"{m.module} " + ("pads its input with zeros" if const[~ok].all() else "sees varying values"))
            keep &= ok
    if not keep.all():
        warnings.warn(
            f"kept {int((~keep).sum())} zero channel(s) of {g.name}: they still carry a constant (a bias or "
            f"BatchNorm shift) that cannot be folded exactly ({'; '.join(sorted(set(reasons)))}). Zero those biases "
            "too (sparsetorch.shrink.prune_channels does) to remove them",
            SparsityWarning, stacklevel=3,
        )
    units = units[keep]

    def folds(final: torch.Tensor) -> list:
        out = []
        for m in g.members:
            if m.role == "in":
                module = modules[m.module]
                v = _unit_values(module, inputs[m.module][0], m, final)
                if (v != 0).any():
                    value = v.mean(0).flatten() if not isinstance(module, nn.modules.conv._ConvNd) else v.mean(0)[:, 0]
                    out.append((module, m.indices(final), value))
        return out

    return units, folds


def _absorbs(module: nn.Module) -> bool:
    """Can a constant input be moved into the bias exactly? Not through zero padding."""
    if isinstance(module, nn.modules.conv._ConvNd):
        pad = module.padding
        return module.padding_mode != "zeros" or pad == "valid" or (not isinstance(pad, str) and not any(pad))
    return True


def _apply(model: nn.Module, modules: dict[str, nn.Module], plan: list[tuple[Group, torch.Tensor]], folds) -> None:
    removed: dict[tuple[str, str, int], set[int]] = {}
    for g, units in plan:
        for m in g.members:
            module = modules[m.module]
            for pname, dim in adapter_for(module).dims.get(m.role, []):
                removed.setdefault((m.module, pname, dim), set()).update(m.indices(units).tolist())
    for module, idx, value in folds:  # before slicing: folds read the full weights
        adapter_for(module).fold(module, idx.to(module.weight.device), value.to(module.weight.device))
    touched = set()
    with torch.no_grad():
        for (name, pname, dim), gone in removed.items():
            module = modules[name]
            old = getattr(module, pname, None)
            if old is None:
                continue
            keep = torch.tensor(sorted(set(range(old.shape[dim])) - gone), dtype=torch.long, device=old.device)
            new = old.detach().index_select(dim, keep).clone()
            if isinstance(old, nn.Parameter):
                module._parameters[pname] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[pname] = new
            touched.add(name)
    for name in touched:
        adapter_for(modules[name]).fix_sizes(modules[name])
    for g, units in plan:
        for name, attr, per_unit in g.attrs:
            setattr(modules[name], attr, getattr(modules[name], attr) - per_unit * units.numel())


def _tensors(out: object) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


def _check_outputs(reference: object, result: object) -> None:
    ref, res = list(_tensors(reference)), list(_tensors(result))
    if len(ref) != len(res) or any(a.shape != b.shape for a, b in zip(ref, res)):
        raise RuntimeError("shrink changed the model's output structure; this is a sparsetorch bug, please report it")
    for a, b in zip(ref, res):
        if a.is_floating_point():
            scale = float(a.abs().max()) if a.numel() else 0.0
            if not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(1.0, scale)):
                raise RuntimeError(
                    f"shrink changed the outputs (max difference {float((a - b).abs().max()):.3g}); "
                    "this is a sparsetorch bug, please report it with the model"
                )
