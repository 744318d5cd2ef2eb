"""``sparsetorch.shrink.prune_channels``: choose whole channels/neurons/heads and mask them."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparsityError, SparsityWarning
from ..core.masks import get_mask, set_mask
from .criteria import CRITERIA, unit_scores
from .groups import Group, adapter_for
from .surgery import as_args, find_groups, run_model
from .channel_graph import TraceFailed

__all__ = ["prune_channels", "prunable_groups"]

_SILENT = ("its channels are model outputs",)


def prune_channels(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    ratio: float | None = None,
    target_flops: float | None = None,
    target_params: float | None = None,
    criterion: str = "l1",
    scope: str = "global",
    example_inputs: object = None,
    batch: object = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> nn.Module:
    """Mask whole channels (and heads, MLP units) of ``model`` in place, ready for ``shrink``.

    Exactly one of:
        sparsity: fraction of the removable units to remove, e.g. 0.5 (``ratio=`` is its
            deprecated old name).
        target_flops / target_params: what should remain, as a fraction of the model's (<= 1,
            e.g. 0.5) or an absolute count (> 1). FLOPs are those of ``sparsetorch.report``.
    criterion: "l1" / "l2" (norm of the producing weights), "bn_scale" (|BatchNorm gamma|),
        "taylor" (first-order loss change; needs ``batch=(inputs, targets)``, ``loss_fn``).
    scope: "global" ranks all units together (every group keeps at least one); "layer" removes
        the same fraction from every group.

    Channels tied by residual additions are chosen together (their scores summed over the group).
    Producing weight rows, biases and BatchNorm affine parameters of a chosen unit are masked, so
    the masked model computes exactly what ``shrink`` will keep.
    """
    sparsity = _renamed_ratio(sparsity, ratio)
    args = as_args(example_inputs)
    given = [n for n, v in (("sparsity", sparsity), ("target_flops", target_flops), ("target_params", target_params))
             if v is not None]
    if len(given) != 1:
        raise SparsityError(f"pass exactly one of sparsity=, target_flops=, target_params= (got {given or 'none'})")
    if criterion not in CRITERIA:
        raise SparsityError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}", criterion=criterion)
    if scope not in ("global", "layer"):
        raise SparsityError(f"unknown scope {scope!r}; use 'global' or 'layer'", scope=scope)
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise SparsityError(f"sparsity must lie in [0, 1) (the fraction of units removed), got {sparsity!r}",
                            sparsity=sparsity)
    for name in ("target_flops", "target_params"):
        value = locals()[name]
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise SparsityError(f"{name} must be a positive fraction (<= 1) or count (> 1), got {value!r}")
    if criterion == "taylor" and batch is None:
        raise SparsityError("criterion='taylor' needs batch=(inputs, targets) (and loss_fn for non-classifiers)")
    was_training = model.training
    try:
        model.eval()  # BatchNorm statistics must not move while we look
        run_model(model, args)  # bad inputs fail here, before anything changes
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    groups = prunable_groups(model, args)
    grads = _gradients(model, batch, loss_fn) if criterion == "taylor" else None
    scored = []
    for g in groups:
        s = unit_scores(g, modules, criterion, grads)
        if s is None:
            warnings.warn(f"{g.name} has no BatchNorm after it; criterion='bn_scale' leaves it as it is",
                          SparsityWarning, stacklevel=2)
        else:
            scored.append((g, s))
    if not scored:
        raise SparsityError(f"no removable channel group has a score for criterion={criterion!r}")
    counts = _choose(model, args, modules, scored, sparsity, target_flops, target_params, scope)
    for (g, s), n in zip(scored, counts):
        if n:
            _mask_units(g, modules, torch.argsort(s, stable=True)[:n])
    return model


def prunable_groups(model: nn.Module, args: tuple) -> list[Group]:
    """Groups whose units can be removed; warns about blocked ones (except model outputs)."""
    try:
        groups = find_groups(model, args)
    except TraceFailed as exc:
        raise SparsityError(f"cannot find channel groups of {type(model).__name__}: {exc}") from None
    out = []
    for g in groups:
        if not any(m.role == "out" and m.decides for m in g.members) or g.size < 2:
            continue
        if g.blocked:
            reasons = [r for r in g.blocked if r not in _SILENT]
            if reasons:
                warnings.warn(f"channels of {', '.join(g.layers('out'))} are left as they are: {'; '.join(reasons)}",
                              SparsityWarning, stacklevel=3)
            continue
        out.append(g)
    return out


def _gradients(model, batch, loss_fn) -> dict[int, torch.Tensor]:
    loss_fn = loss_fn or nn.functional.cross_entropy
    batches = [batch] if isinstance(batch, tuple) else list(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    total = {id(p): torch.zeros_like(p) for p in params}
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            loss = loss_fn(model(*inputs), targets)
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    total[id(p)] += g
    finally:
        model.train(was_training)
    return total


def _renamed_ratio(sparsity, ratio):
    """``ratio=`` is the old name of ``sparsity=``: warn and use it."""
    if ratio is None:
        return sparsity
    if sparsity is not None:
        raise SparsityError("pass sparsity= only; ratio= is its deprecated old name", sparsity=sparsity, ratio=ratio)
    warnings.warn("prune_channels(ratio=...) is deprecated; use sparsity=", DeprecationWarning, stacklevel=3)
    return ratio


def _choose(model, args, modules, scored, ratio, target_flops, target_params, scope) -> list[int]:
    """How many units each group loses."""
    sizes = [g.size for g, _ in scored]
    if scope == "layer":
        def counts_at(r: float) -> list[int]:
            return [min(int(r * n), n - 1) for n in sizes]
    else:
        # global order of units by score, each group's best unit never listed (it always stays)
        entries = []
        for gi, (g, s) in enumerate(scored):
            order = torch.argsort(s, stable=True)[:-1]
            entries += [(float(s[u]), gi) for u in order]
        entries.sort(key=lambda e: e[0])
        prefix = [[0] * len(scored)]
        for _, gi in entries:
            row = list(prefix[-1])
            row[gi] += 1
            prefix.append(row)
        total = sum(sizes)

        def counts_at(r: float) -> list[int]:
            return prefix[min(int(round(r * total)), len(entries))]
    if ratio is not None:
        return counts_at(ratio)
    cost = _CostModel(model, args, modules, [g for g, _ in scored])
    which, target = ("flops", target_flops) if target_flops is not None else ("params", target_params)
    full = cost(which, [0] * len(scored))
    goal = target * full if target <= 1 else target
    if cost(which, counts_at(1.0)) > goal:
        raise SparsityError(
            f"target_{which}={target} cannot be reached: removing all but one unit of every removable group "
            f"leaves {cost(which, counts_at(1.0)):,.0f} of {full:,.0f}; the rest is in layers that are kept"
        )
    lo, hi = 0.0, 1.0  # smallest removal fraction meeting the goal
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(which, counts_at(mid)) <= goal:
            hi = mid
        else:
            lo = mid
    return counts_at(hi)


class _CostModel:
    """Parameters and FLOPs (as sparsetorch.report counts them) after removing n units per group."""

    def __init__(self, model, args, modules, groups):
        from ..explain.layer_report import report

        self.groups, self.modules = groups, modules
        self.params = {(n, p): tuple(t.shape) for n, m in modules.items() for p, t in m.named_parameters(recurse=False)}
        self.flops = {r.name: r.dense_flops or 0 for r in report(model, args).rows}

    def __call__(self, which: str, counts: list[int]) -> float:
        cut: dict[tuple[str, str, int], int] = {}
        for g, n in zip(self.groups, counts):
            for m in g.members:
                for pname, dim in adapter_for(self.modules[m.module]).dims.get(m.role, []):
                    cut[(m.module, pname, dim)] = cut.get((m.module, pname, dim), 0) + n * m.inner
        if which == "params":
            total = 0
            for (name, pname), shape in self.params.items():
                total += math.prod(max(s - cut.get((name, pname, d), 0), 0) for d, s in enumerate(shape))
            return float(total)
        total = 0.0
        for name, flops in self.flops.items():
            shape = self.params.get((name, "weight"))
            if shape is None:
                total += flops
                continue
            kept = math.prod(max(s - cut.get((name, "weight", d), 0), 0) for d, s in enumerate(shape))
            total += flops * kept / max(math.prod(shape), 1)
        return total


def _mask_units(g: Group, modules: dict[str, nn.Module], units: torch.Tensor) -> None:
    for m in g.members:
        if m.role == "in":
            continue
        module = modules[m.module]
        idx = m.indices(units)
        for pname, dim in adapter_for(module).dims.get(m.role, []):
            p = getattr(module, pname, None)
            if not isinstance(p, nn.Parameter):
                continue
            keep = torch.ones(p.shape[dim], dtype=torch.bool)
            keep[idx] = False
            shape = [1] * p.dim()
            shape[dim] = -1
            mask = keep.reshape(shape).expand_as(p).to(p.device)
            old = get_mask(module, pname)
            set_mask(module, mask if old is None else mask & old, pname)
