"""``sparsetorch.prune``: one-shot pruning of any model, in place."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from . import distributions
from ..errors import SparsityError, SparsityWarning, check_sparsity
from .masks import get_mask, set_mask
from .patterns import Pattern, check_pattern_fits, parse_pattern, pattern_mask, unit_scores
from .rng import resolve_generator
from .scores import SCORES
from .sharded_pruning import any_sharded, compute_masks_sharded
from .layer_selection import Spec, Target, select_targets

__all__ = ["prune", "compute_masks", "check_finite"]

class _DefaultSparsity(float):
    """0.9, but distinguishable from a 0.9 the user passed (N:M patterns fix their own sparsity)."""

    def __repr__(self) -> str:
        return "0.9"


DEFAULT_SPARSITY = _DefaultSparsity(0.9)


def prune(
    model: nn.Module,
    sparsity: float | None = DEFAULT_SPARSITY,
    *,
    method: str = "magnitude",
    scope: str = "global",
    pattern: str = "unstructured",
    include: Spec = None,
    exclude: Spec = None,
    generator: torch.Generator | None = None,
    distribution: str = "uniform",
    min_density: float | None = None,
    batch: object = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> nn.Module:
    """Prune ``model`` in place to ``sparsity`` and return it.

    Args:
        sparsity: fraction of eligible weights removed, in [0, 1). N:M patterns fix it at
            1 - N/M (pass None or that value).
        method: score deciding what stays: "magnitude" (|w|), "random", or "gradient"
            (|w * dL/dw|, needs ``batch``).
        scope: "global" ranks all eligible weights together (a layer never drops below
            ``min_density``, default a tenth of the target density); "layer" gives each layer
            its density from ``distribution`` ("uniform", "er", "erk").
        pattern: "unstructured", "N:M" (e.g. "2:4"), "block:RxC" (e.g. "block:16x16") or "channel".
        include / exclude: module types and fully-qualified-name globs. By default every
            Linear/Conv1d/Conv2d/Conv3d weight except a final classifier / ``lm_head``.
        generator: the randomness of ``method="random"``; same seed, same masks.
        batch: for "gradient": ``(inputs, targets)`` or an iterable of such batches.
        loss_fn: for "gradient": ``loss_fn(outputs, targets)``, default cross-entropy.

    Pruned weights are set to zero and kept zero through training (see ``sparsetorch.core.masks``).
    Already-pruned weights stay pruned. Nothing is changed if any argument is invalid.

    Example::

        model = sparsetorch.prune(model, 0.9)                    # 90% global magnitude
        model = sparsetorch.prune(model, pattern="2:4", scope="layer")
    """
    targets = select_targets(model, include, exclude)
    masks = compute_masks(
        targets, sparsity, method=method, scope=scope, pattern=pattern, generator=generator,
        distribution=distribution, min_density=min_density, model=model, batch=batch, loss_fn=loss_fn,
    )
    for target, mask in zip(targets, masks):
        set_mask(target.module, mask, target.name)
    return model


def resolve_density(sparsity: float | None, pattern: Pattern) -> float:
    """Target density from the requested sparsity, honouring N:M's fixed density."""
    fixed = pattern.fixed_density
    if fixed is not None:
        if sparsity is not None and sparsity is not DEFAULT_SPARSITY and abs(1 - check_sparsity(sparsity) - fixed) > 1e-9:
            raise SparsityError(
                f"pattern '{pattern}' fixes sparsity at {1 - fixed:g}; got sparsity={sparsity}. "
                "Pass sparsity=None or a matching value",
                sparsity=sparsity, pattern=str(pattern),
            )
        return fixed
    return 1.0 - check_sparsity(float(DEFAULT_SPARSITY) if sparsity is None else sparsity)


def check_finite(targets: Iterable[Target]) -> None:
    for t in targets:
        if not torch.isfinite(t.param.detach()).all():
            raise SparsityError(
                f"{t.qualified_name} contains NaN or inf; fix the weights (e.g. lower the learning "
                "rate or reload a checkpoint) before pruning",
                layer=t.qualified_name,
            )


def compute_masks(
    targets: list[Target],
    sparsity: float | None,
    *,
    method: str = "magnitude",
    scope: str = "global",
    pattern: str | Pattern = "unstructured",
    generator: torch.Generator | None = None,
    distribution: str = "uniform",
    min_density: float | None = None,
    model: nn.Module | None = None,
    batch: object = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    scores: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | Iterator[torch.Tensor]:
    """New keep-masks for ``targets`` without touching the model (the core of ``prune``).

    ``scores`` may be given precomputed (one tensor per target); otherwise ``method`` computes them.
    Under FSDP2 (DTensor parameters) the result is an iterator of full masks that gathers one layer at a
    time (``sharded_pruning``), equal to this function's on the unsharded model.
    """
    pat = parse_pattern(pattern)
    density = resolve_density(sparsity, pat)
    if scope not in ("global", "layer"):
        raise SparsityError(f"unknown scope {scope!r}; use 'global' or 'layer'", scope=scope)
    if method not in SCORES and scores is None:
        raise SparsityError(f"unknown method {method!r}; choose one of {sorted(SCORES)}", method=method)
    if scores is None and any_sharded(targets):
        return compute_masks_sharded(targets, density, pat, method=method, scope=scope, distribution=distribution,
                                     min_density=min_density, generator=generator)
    for t in targets:
        check_pattern_fits(t.param.shape, pat, t.qualified_name)
    check_finite(targets)
    if scores is None:
        # one stream for all layers: a fresh seed per layer would give same-shaped layers the same scores
        scores = _scores(targets, method, resolve_generator(generator), model, batch, loss_fn)
    # weights already pruned go first: pruning is monotone
    olds = [get_mask(t.module, t.name) for t in targets]
    olds = [None if old is None else old.cpu() for old in olds]
    scores = [_demote_pruned(s, old) for s, old in zip(scores, olds)]
    densities = _densities(targets, scores, density, pat, scope, distribution, min_density)
    masks = [pattern_mask(s, d, pat) for s, d in zip(scores, densities)]
    if pat.kind in ("unstructured", "nm"):  # structured patterns keep whole units, zeros included
        masks = [m if old is None else m & old for m, old in zip(masks, olds)]
    return masks


def _demote_pruned(score: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    score = score.detach().float().cpu()
    return score if old is None else torch.where(old, score, torch.full_like(score, -1.0))


def _densities(targets, scores, density, pat, scope, distribution, min_density) -> list[float]:
    if pat.fixed_density is not None:
        return [pat.fixed_density] * len(targets)
    if scope == "layer":
        return distributions.layer_densities(distribution, [t.param.shape for t in targets], 1.0 - density)
    floor = density / 10 if min_density is None else float(min_density)
    pooled = [unit_scores(s, pat) for s in scores]
    densities = distributions.global_densities([p[0] for p in pooled], [p[1] for p in pooled], density, floor)
    raised = [t.qualified_name for t, d in zip(targets, densities) if abs(d - floor) < 1e-12 and floor > 0]
    if raised:
        warnings.warn(
            f"global pruning would have left {len(raised)} layer(s) below the minimum density {floor:.4g}; "
            f"kept them at it: {', '.join(raised)}",
            SparsityWarning,
            stacklevel=4,
        )
    return densities


def _scores(targets, method, generator, model, batch, loss_fn) -> list[torch.Tensor]:
    if method == "gradient":
        grads = _gradients(model, targets, batch, loss_fn)
        return [SCORES["gradient"](t.param, grad=g) for t, g in zip(targets, grads)]
    return [SCORES[method](t.param, generator=generator) for t in targets]


def _gradients(model, targets, batch, loss_fn) -> list[torch.Tensor]:
    """Gradients of the loss on ``batch`` for every target, leaving the model's .grad untouched."""
    if model is None or batch is None:
        raise SparsityError("method='gradient' needs batch=(inputs, targets) (or an iterable of such batches)")
    loss_fn = loss_fn or nn.functional.cross_entropy
    batches = [batch] if isinstance(batch, tuple) else list(batch)
    if not batches:
        raise SparsityError("method='gradient' got an empty batch iterable")
    params = [t.param for t in targets]
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    try:
        for inputs, labels in batches:
            loss = loss_fn(model(inputs), labels)
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc += g
    finally:
        model.train(was_training)
    return total
