"""Synthetic data with planted features: a few inputs decide the label, the rest are noise."""
from __future__ import annotations

import torch

from ..core.rng import resolve_generator
from ..errors import SparsityError
from .digits import Split


def planted_features(n_train: int = 5000, n_test: int = 2000, n_features: int = 100, n_planted: int = 5,
                     generator: torch.Generator | None = None) -> tuple[Split, list[int]]:
    """Binary labels from a nonlinear function of ``n_planted`` randomly placed inputs.

    x ~ N(0, 1)^n_features; with planted inputs p_0, p_1, ... the score sums one nonlinear term
    per input, cycling through tanh(2p), sin(2p), 0.7 p^2, |p|, each of comparable variance so
    that every planted input carries signal; thresholded at its median so the classes are
    balanced. Returns the split and the planted feature indices.
    """
    if n_planted < 1 or n_planted > n_features:
        raise SparsityError(f"need 1 <= n_planted <= n_features, got n_planted={n_planted}, n_features={n_features}")
    g = resolve_generator(generator)
    planted = sorted(torch.randperm(n_features, generator=g)[:n_planted].tolist())
    x = torch.randn(n_train + n_test, n_features, generator=g)
    terms = (lambda p: torch.tanh(2 * p), lambda p: torch.sin(2 * p), lambda p: 0.7 * p**2, torch.abs)
    score = sum(terms[k % len(terms)](x[:, i]) for k, i in enumerate(planted))
    y = (score > score.median()).long()
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:]), planted
