"""A minimal, seeded training loop for the built-in demos and benchmarks (not a framework)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["fit", "accuracy"]


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
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    make_sparsifier: Callable[[nn.Module, torch.optim.Optimizer], object] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train ``model`` with Adam (or ``make_optimizer``) on ``(x, y)``; returns the model.

    ``make_sparsifier(model, optimizer)`` returns an attached sparsifier that is stepped after
    every optimizer step. Shuffling draws from ``generator``.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model) if make_optimizer else torch.optim.Adam(model.parameters(), lr, weight_decay=weight_decay)
    sparsifier = make_sparsifier(model, optimizer) if make_sparsifier else None
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
