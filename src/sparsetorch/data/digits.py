"""scikit-learn's bundled 8x8 digits (1797 images), split and scaled for training."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    x_train: torch.Tensor  # [N, 64] float32 in [0, 1]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The digits data shuffled with ``seed`` and split; needs scikit-learn (``sparsetorch[demo]``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data comes with scikit-learn: pip install 'sparsetorch[demo]'") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])
