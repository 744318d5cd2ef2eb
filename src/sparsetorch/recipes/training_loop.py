"""The one seeded training loop of the demos, the ``sparsetorch train`` command and the benchmarks (not a framework)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..core.rng import resolve_generator
from ..errors import SparsityError

__all__ = ["fit", "accuracy", "LR_SCHEDULES"]

LR_SCHEDULES = ("constant", "cosine")


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    sparsifier: object = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    make_sparsifier: Callable[[nn.Module, torch.optim.Optimizer], object] | None = None,
    lr_schedule: str = "constant",
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Minibatch cross-entropy training of ``model`` on ``(x, y)``; returns the model (in eval mode).

    The optimizer is ``optimizer``, else ``make_optimizer(model)``, else Adam(lr, weight_decay). A sparsifier
    (``sparsifier``, or ``make_sparsifier(model, optimizer)`` returning an attached one) steps after every
    optimizer step. ``lr_schedule="cosine"`` anneals the learning rate to zero over the run (Loshchilov &
    Hutter 2017). Shuffling draws from ``generator`` (the library's default seed when None).
    """
    if lr_schedule not in LR_SCHEDULES:
        raise SparsityError(f"unknown lr schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
    generator = resolve_generator(generator)
    if optimizer is None:
        optimizer = make_optimizer(model) if make_optimizer else torch.optim.Adam(model.parameters(), lr,
                                                                                   weight_decay=weight_decay)
    if sparsifier is None and make_sparsifier is not None:
        sparsifier = make_sparsifier(model, optimizer)
    scheduler = None
    if lr_schedule == "cosine":
        total = epochs * -(-len(x) // batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if sparsifier is not None:
                sparsifier.step()
        if on_epoch:
            on_epoch(epoch)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return acc
