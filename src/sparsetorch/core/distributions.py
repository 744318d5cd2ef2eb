"""Layer-wise density distributions: how a total density is split across layers.

Pure functions of layer shapes (and, for global, scores). Each returns one density per
layer such that ``sum(d_l * n_l) ~= density * sum(n_l)`` and every ``d_l`` lies in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import SparsityError, check_sparsity

__all__ = ["uniform", "er", "erk", "global_densities", "densities_with_floor", "layer_densities", "DISTRIBUTIONS"]

Shape = Sequence[int]


def uniform(shapes: Sequence[Shape], density: float) -> list[float]:
    """Every layer gets the same density."""
    return [float(density)] * len(shapes)


def _scaled(raw: Sequence[float], sizes: Sequence[int], density: float) -> list[float]:
    """Densities ``eps * raw_l`` meeting the budget, layers with ``eps*raw_l > 1`` made dense.

    Evci et al. 2020 (RigL, App. A): solve eps from sum(eps*raw_l*n_l) = density*N over the
    non-dense layers; if some layer exceeds 1, fix it dense and solve again for the rest.
    """
    dense: set[int] = set()
    budget_total = density * sum(sizes)
    while True:
        budget = budget_total - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / weight if weight > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense.update(over)


def er(shapes: Sequence[Shape], density: float) -> list[float]:
    """Erdos-Renyi (Mocanu et al. 2018): density proportional to (n_in + n_out) / (n_in * n_out)."""
    raw = [(s[0] + math.prod(s[1:2])) / (s[0] * math.prod(s[1:2])) for s in shapes]
    return _scaled(raw, [math.prod(s) for s in shapes], density)


def erk(shapes: Sequence[Shape], density: float) -> list[float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density proportional to sum(shape) / prod(shape)."""
    raw = [sum(s) / math.prod(s) for s in shapes]
    return _scaled(raw, [math.prod(s) for s in shapes], density)


def global_densities(
    unit_scores: Sequence[torch.Tensor],
    unit_sizes: Sequence[torch.Tensor],
    density: float,
    min_density: float = 0.0,
) -> list[float]:
    """Densities from one global ranking of units (weights, blocks or channels) across layers.

    The highest-scoring units overall are kept until ``density`` of all weights is covered.
    Any layer left below ``min_density`` is raised to it and the remaining budget is ranked
    again over the other layers, so global pruning never wipes out a layer.
    """
    def kept(free: list[int], budget: float) -> list[float]:
        return _global_kept([unit_scores[i] for i in free], [unit_sizes[i] for i in free], budget)

    return densities_with_floor([float(s.sum()) for s in unit_sizes], kept, density, min_density)


def densities_with_floor(sizes: Sequence[float], kept: Callable[[list[int], float], list[float]], density: float,
                         min_density: float = 0.0) -> list[float]:
    """``global_densities``' budget loop over any ranking: ``kept(free layers, budget)`` says how many weights
    of each free layer the global ranking keeps within ``budget``; layers below ``min_density`` are fixed at it
    and the rest ranked again. (Sharded layers under FSDP2 rank by a distributed threshold instead.)"""
    total = sum(sizes)
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(len(sizes)) if i not in fixed]
        budget = density * total - sum(fixed[i] * sizes[i] for i in fixed)
        out = dict(fixed)
        out.update({i: k / sizes[i] for i, k in zip(free, kept(free, max(budget, 0.0)))})
        low = [i for i in free if out[i] < min_density]
        if not low:
            return [out[i] for i in range(len(sizes))]
        fixed.update({i: min_density for i in low})


def _global_kept(scores: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor], budget: float) -> list[float]:
    if not scores:
        return []
    all_scores = torch.cat([s.flatten().float() for s in scores])
    all_sizes = torch.cat([s.flatten().float() for s in sizes])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    order = torch.argsort(all_scores, descending=True, stable=True)
    covered = torch.cumsum(all_sizes[order], dim=0)
    count = int(torch.searchsorted(covered, torch.tensor(budget + 0.5), right=True))
    kept = torch.zeros(len(scores))
    kept.index_add_(0, owner[order[:count]], all_sizes[order[:count]])
    return kept.tolist()


DISTRIBUTIONS = {"uniform": uniform, "er": er, "erk": erk}


def layer_densities(name: str, shapes: Sequence[Shape], sparsity: float) -> list[float]:
    """Densities by distribution ``name`` ("uniform", "er", "erk") for overall ``sparsity``."""
    sparsity = check_sparsity(sparsity)
    try:
        fn = DISTRIBUTIONS[name.lower()]
    except (KeyError, AttributeError):
        raise SparsityError(
            f"unknown distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)} (or scope='global')",
            distribution=name,
        ) from None
    return fn([tuple(s) for s in shapes], 1.0 - sparsity)
