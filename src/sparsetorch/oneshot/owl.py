"""OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more outlier
weights keep more of them.

A block's outlier ratio is the fraction of its Wanda scores |W_ij| * ||X_j|| above ``m`` times
their mean (the paper's M = 5). Ratios are mapped linearly onto densities spread over ``2 * lam``
(the paper's lambda = 0.08) and centred on the target, so the parameter-weighted mean density is
exactly the target. Pure functions; the driver collects the statistics block by block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsityError

__all__ = ["OWL", "outlier_ratio", "owl_densities"]


@dataclass(frozen=True)
class OWL:
    """OWL's two hyperparameters: ``m``, the outlier threshold in multiples of the mean score, and
    ``lam``, half the spread of the densities around the target (max - min = 2 * lam)."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if not (self.m > 0):
            raise SparsityError(f"OWL(m={self.m!r}): the outlier threshold must be > 0 (the paper uses 5)", m=self.m)
        if not (0 <= self.lam < 0.5):
            raise SparsityError(f"OWL(lam={self.lam!r}): lambda must lie in [0, 0.5) (the paper uses 0.08)",
                                lam=self.lam)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all of a block's scores above ``m`` x their mean (OWL's layerwise outlier distribution, eq. 2)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).float().mean())


def owl_densities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block densities: ratios min-max scaled onto [0, 2 * lam], shifted so that the
    ``sizes``-weighted mean is ``target`` (OWL, section 3.2), then kept inside [0, 1].

    Equal ratios give the uniform ``target`` everywhere."""
    if len(ratios) != len(sizes) or not ratios:
        raise SparsityError("owl_densities needs one ratio and one size per block")
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span <= 0 or lam == 0:
        return [target] * len(ratios)
    d = (r - r.min()) * (2 * lam / span)  # [blocks], in [0, 2 lam]
    d = d - (d * w).sum() / w.sum() + target  # weighted mean == target
    if float(d.min()) < 0 or float(d.max()) > 1:
        d = _clip_keeping_mean(d, w, target)
    return [float(x) for x in d]


def _clip_keeping_mean(d: torch.Tensor, w: torch.Tensor, target: float) -> torch.Tensor:
    """Clip densities into [0, 1] and spread the clipped amount over the others (same weighted mean)."""
    for _ in range(len(d)):
        d = d.clamp(0.0, 1.0)
        excess = float((d * w).sum() / w.sum()) - target
        free = (d > 0) & (d < 1)
        if abs(excess) < 1e-12 or not bool(free.any()):
            break
        d = torch.where(free, d - excess * w.sum() / w[free].sum(), d)
    return d
