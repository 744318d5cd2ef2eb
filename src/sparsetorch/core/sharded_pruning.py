"""``compute_masks`` for FSDP2-sharded layers: the same masks as one process, one full layer at a time.

A layer's new mask needs a global view (its top-k, its per-layer density), so each layer's scores are
gathered (``full_tensor``) in turn, its mask computed identically on every rank, and the caller keeps only
the local shard before the next layer is gathered. Global scope ranks every weight of every layer: for
unstructured masks that ranking is found without gathering anything, by a bisection on the threshold over
the local shards (one all-reduce of a count per bit of a float32), so peak memory stays one sharded copy
of the scores plus one full layer. Block and channel patterns pool each layer into units first and rank
the pooled units (a block or a row per unit: small) exactly as ``distributions.global_densities`` does.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from . import distributions
from ..errors import SparsityError, SparsityWarning
from .distributed import all_reduce_small, full, is_sharded, local, shard_like
from .layer_selection import Target
from .masks import get_mask, shard_masks
from .patterns import Pattern, check_pattern_fits, pattern_mask, unit_scores
from .rng import resolve_generator
from .scores import SCORES

__all__ = ["compute_masks_sharded", "any_sharded", "sortable_keys", "kth_largest_key"]


def any_sharded(targets: Sequence[Target]) -> bool:
    """True when some target parameter is an FSDP2 DTensor."""
    return any(is_sharded(t.param) for t in targets)


def compute_masks_sharded(targets: list[Target], density: float, pat: Pattern, *, method: str, scope: str,
                          distribution: str, min_density: float | None,
                          generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Full masks, one layer at a time, equal to ``post_training.compute_masks`` on the unsharded model.

    Checks everything first (an error leaves every mask as it was); the returned iterator gathers one layer
    per mask. ``method``: "magnitude" or "random" (scores that need a batch are not distributed).
    """
    if method not in ("magnitude", "random"):
        raise SparsityError(f"method {method!r} is not available on FSDP2-sharded layers; use 'magnitude' or "
                            "'random', or compute masks before fully_shard", method=method)
    for t in targets:
        check_pattern_fits(t.param.shape, pat, t.qualified_name)
    _check_finite_sharded(targets)
    shard_masks(*{id(t.module): t.module for t in targets}.values())  # masks set before fully_shard
    generator = resolve_generator(generator)
    # sharded scores, demoted where already pruned (pruning is monotone), as compute_masks does
    scores = [_sharded_scores(t, method, generator) for t in targets]
    densities = _densities(targets, scores, density, pat, scope, distribution, min_density)
    return _masks(targets, scores, densities, pat)


def _masks(targets, scores, densities, pat) -> Iterator[torch.Tensor]:
    for t, score, d in zip(targets, scores, densities):
        mask = pattern_mask(full(score).cpu(), d, pat)
        old = get_mask(t.module, t.name)
        if old is not None and pat.kind in ("unstructured", "nm"):
            mask &= full(old).cpu()
        yield mask


def _sharded_scores(t: Target, method: str, generator: torch.Generator) -> torch.Tensor:
    param = t.param
    if method == "random":  # the whole layer's draw, so the stream is the single process's
        score = shard_like(SCORES["random"](param, generator=generator), param) if is_sharded(param) else \
            SCORES["random"](param, generator=generator)
    else:
        score = SCORES["magnitude"](param).float()
    old = get_mask(t.module, t.name)
    return score if old is None else torch.where(old, score, torch.full_like(score, -1.0))


def _check_finite_sharded(targets: Sequence[Target]) -> None:
    bad = torch.tensor([0 if bool(torch.isfinite(local(t.param.detach())).all()) else 1 for t in targets])
    bad = all_reduce_small(bad, dist.ReduceOp.MAX)
    for t, b in zip(targets, bad.tolist()):
        if b:
            raise SparsityError(f"{t.qualified_name} contains NaN or inf; fix the weights (e.g. lower the learning "
                                "rate or reload a checkpoint) before pruning", layer=t.qualified_name)


def _densities(targets, scores, density, pat, scope, distribution, min_density) -> list[float]:
    if pat.fixed_density is not None:
        return [pat.fixed_density] * len(targets)
    if scope == "layer":
        return distributions.layer_densities(distribution, [t.param.shape for t in targets], 1.0 - density)
    if scope != "global":
        raise SparsityError(f"unknown scope {scope!r}; use 'global' or 'layer'", scope=scope)
    floor = density / 10 if min_density is None else float(min_density)
    if pat.kind == "unstructured":
        densities = _global_by_threshold(scores, density, floor)
    else:
        pooled = [unit_scores(full(s).cpu(), pat) for s in scores]  # one unit per block or row: small
        densities = distributions.global_densities([p[0] for p in pooled], [p[1] for p in pooled], density, floor)
    raised = [t.qualified_name for t, d in zip(targets, densities) if abs(d - floor) < 1e-12 and floor > 0]
    if raised:
        warnings.warn(f"global pruning would have left {len(raised)} layer(s) below the minimum density "
                      f"{floor:.4g}; kept them at it: {', '.join(raised)}", SparsityWarning, stacklevel=4)
    return densities


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 ``values`` (IEEE-754 bits, negatives flipped); no NaN."""
    bits = values.float().contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def kth_largest_key(keys: Sequence[torch.Tensor], k: int) -> int:
    """The k-th largest (k >= 1) key over ``keys`` on every rank: bisection on the key with one all-reduced
    count per step (about 32 steps), so no rank ever holds another rank's keys."""
    lo, hi = -(2 ** 31), 2 ** 31 - 1  # answer in [lo, hi]: count(>= lo) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_at_least(keys, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _count_at_least(keys: Sequence[torch.Tensor], threshold: int) -> int:
    count = torch.tensor([sum(int((k >= threshold).sum()) for k in keys)], dtype=torch.long)
    return int(all_reduce_small(count))


def _counted_part(score: torch.Tensor) -> torch.Tensor:
    """What this rank counts of ``score``: its shard, or for a replicated (unsharded) layer all of it on rank 0
    and nothing elsewhere, so that the all-reduced counts cover each weight once."""
    if is_sharded(score) or not dist.is_initialized() or dist.get_rank() == 0:
        return local(score)
    return score.new_empty(0)


def _global_by_threshold(scores: Sequence[torch.Tensor], density: float, floor: float) -> list[float]:
    """``distributions.global_densities`` for single-weight units on sharded scores: keep the top ``count``
    weights of the free layers, ties at the threshold going to earlier layers first (the stable ranking of
    the concatenated layers)."""
    keys = [sortable_keys(_counted_part(s).detach().flatten()) for s in scores]
    sizes = [float(s.numel()) for s in scores]

    def kept(free: list[int], budget: float) -> list[float]:
        if not free:
            return []
        n = int(sum(sizes[i] for i in free))
        count = min(n, max(0, int(float(torch.tensor(budget + 0.5)))))  # float32 rounding as global_densities
        if count == 0:
            return [0.0] * len(free)
        t = kth_largest_key([keys[i] for i in free], count)
        above = all_reduce_small(torch.tensor([[int((keys[i] > t).sum()), int((keys[i] == t).sum())] for i in free],
                                              dtype=torch.long))
        left = count - int(above[:, 0].sum())
        out = []
        for gt, eq in above.tolist():
            tie = min(left, eq)
            left -= tie
            out.append(float(gt + tie))
        return out

    return distributions.densities_with_floor(sizes, kept, density, floor)
