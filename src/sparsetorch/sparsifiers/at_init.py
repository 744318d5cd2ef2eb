"""Pruning at initialisation: SNIP, GraSP and SynFlow choose a mask before training, ``Static`` keeps it.

Each is a ``Static`` whose initial masks come from a saliency score of the freshly
initialised weights (global ranking, default minimum layer density a tenth of the target):

* ``SNIP`` (Lee et al. 2019): |w * dL/dw| on a batch -- connection sensitivity.
* ``GraSP`` (Wang et al. 2020): keeps weights whose removal would reduce gradient flow most,
  score -w * (H g); the ``score`` functions return "higher is kept", i.e. w * (H g).
* ``SynFlow`` (Tanaka et al. 2020): data-free; |w * dR/dw| with R = 1^T (prod_l |W_l|) 1,
  pruned over ``rounds`` rounds on the exponential schedule so no layer collapses.

The score functions are pure (they leave the model as it was) and usable on their own.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core import schedules
from ..errors import SparsityError
from ..core.masks import set_mask
from ..core.post_training import compute_masks
from ..core.layer_selection import Target, select_targets
from .static import Static

__all__ = ["SNIP", "GraSP", "SynFlow", "snip_scores", "grasp_scores", "synflow_masks"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batches(batch: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if batch is None:
        raise SparsityError("this method needs data: pass batch=(inputs, targets) or a list of such batches")
    batches = [batch] if isinstance(batch, tuple) else list(batch)
    if not batches:
        raise SparsityError("batch= is an empty list; pass at least one (inputs, targets) batch")
    return batches


def snip_scores(model: nn.Module, targets: Sequence[Target], batch: object,
                loss_fn: LossFn | None = None) -> list[torch.Tensor]:
    """Lee et al. 2019: connection sensitivity |w * dL/dw|, summed over the batches."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = [t.param for t in targets]
    total = [torch.zeros_like(p) for p in params]
    with _eval(model):
        for x, y in _batches(batch):
            for acc, g in zip(total, torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)):
                if g is not None:
                    acc += g
    return [(p.detach() * g).abs() for p, g in zip(params, total)]


def grasp_scores(model: nn.Module, targets: Sequence[Target], batch: object,
                 loss_fn: LossFn | None = None) -> list[torch.Tensor]:
    """Wang et al. 2020: w * (H g), higher kept (removing those weights hurts gradient flow most).

    H g is a Hessian-gradient product by double backward: d/dw (g_const . dL/dw).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = [t.param for t in targets]
    batches = _batches(batch)
    with _eval(model):
        grads = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            for acc, g in zip(grads, torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)):
                if g is not None:
                    acc += g
        hg = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True, allow_unused=True)
            z = sum((gi * ci).sum() for gi, ci in zip(g, grads) if gi is not None)
            for acc, h in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
                if h is not None:
                    acc += h
    return [p.detach() * h for p, h in zip(params, hg)]


@torch.no_grad()
def _synflow_round_scores(model: nn.Module, targets: Sequence[Target], ones: torch.Tensor) -> list[torch.Tensor]:
    params = [t.param for t in targets]
    with torch.enable_grad():
        r = model(ones).sum()  # R = 1^T (prod |W|) 1 with every parameter made positive
        grads = torch.autograd.grad(r, params, allow_unused=True)
    return [(p * g).abs() if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]


def synflow_masks(model: nn.Module, sparsity: float, example_inputs: torch.Tensor, *, rounds: int = 100,
                  include: Any = None, exclude: Any = None, pattern: str = "unstructured") -> list[torch.Tensor]:
    """Tanaka et al. 2020: keep-masks from iterative synaptic flow pruning, one per target.

    Works on a float64 copy whose parameters are |w| (BatchNorm in eval), feeding an all-ones
    input shaped like ``example_inputs``; every round prunes to ``schedules.exponential``.
    The model itself is not changed.
    """
    work = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in work.parameters():
            p.abs_()
    targets = select_targets(work, include, exclude)
    ones = torch.ones_like(example_inputs, dtype=torch.float64)
    for r in range(1, rounds + 1):
        scores = _synflow_round_scores(work, targets, ones)
        masks = compute_masks(targets, schedules.exponential(r, rounds=rounds, final=sparsity),
                              scope="global", pattern=pattern, scores=scores, min_density=0.0)
        for t, m in zip(targets, masks):
            set_mask(t.module, m, t.name)
    return [m.cpu() for m in masks]


class _eval:
    """Score in eval mode (no dropout noise, BatchNorm running stats untouched), then restore."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


class SNIP(Static):
    """Static masks chosen by SNIP on ``batch`` at attach time.

    Example::

        SNIP(sparsity=0.95, batch=(x[:256], y[:256])).attach(model, optimizer)
    """

    def __init__(self, sparsity: float = 0.9, *, batch: object = None, loss_fn: LossFn | None = None,
                 **kwargs: Any):
        super().__init__(sparsity, **kwargs)
        _batches(batch)
        self.batch, self.loss_fn = batch, loss_fn

    def initial_masks(self) -> list[torch.Tensor]:
        return self.score_masks(snip_scores(self.model, self.targets, self.batch, self.loss_fn))


class GraSP(SNIP):
    """Static masks chosen by GraSP on ``batch`` at attach time (same arguments as ``SNIP``)."""

    def initial_masks(self) -> list[torch.Tensor]:
        return self.score_masks(grasp_scores(self.model, self.targets, self.batch, self.loss_fn))


class SynFlow(Static):
    """Static masks chosen data-free by SynFlow (``rounds`` rounds) at attach time.

    Args:
        example_inputs: a tensor shaped like one input batch (only its shape is used).

    Example::

        SynFlow(sparsity=0.98, example_inputs=torch.zeros(1, 64), rounds=100).attach(model, optimizer)
    """

    def __init__(self, sparsity: float = 0.9, *, example_inputs: torch.Tensor | None = None, rounds: int = 100,
                 **kwargs: Any):
        super().__init__(sparsity, **kwargs)
        if not isinstance(example_inputs, torch.Tensor):
            raise SparsityError("SynFlow needs example_inputs=<a tensor shaped like one input batch>, "
                                "e.g. torch.zeros(1, 64)")
        self.example_inputs = example_inputs
        self.rounds = schedules.check_every(rounds, "SynFlow rounds")

    def initial_masks(self) -> list[torch.Tensor]:
        return synflow_masks(self.model, self.sparsity, self.example_inputs, rounds=self.rounds,
                             include=self.include, exclude=self.exclude, pattern=self.pattern)
