"""Sparsity patterns: which sets of weights are kept or removed together.

A pattern turns a score tensor (higher = more important) into a boolean keep-mask.
Every pattern works on the 2-D view ``[out, rest]`` of a weight (Linear ``[out, in]``,
Conv ``[out, in/groups * k...]``) and groups scores into *units* (one weight, an N:M
group slot, an RxC block, an output channel). All functions here are pure.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import SparsityError

__all__ = ["Pattern", "parse_pattern", "pattern_mask", "unit_scores", "is_valid_mask"]


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is unstructured, nm, block or channel."""

    kind: str
    n: int = 0  # nm: keep n ...
    m: int = 0  # ... of every m consecutive inputs
    rows: int = 1  # block height
    cols: int = 1  # block width

    @property
    def fixed_density(self) -> float | None:
        """N:M fixes the density at n/m; other patterns take any density."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        return self.kind


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*block\s*:\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse "unstructured", "N:M" (e.g. "2:4"), "block:RxC" (e.g. "block:16x16") or "channel"."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise SparsityError(f"pattern must be a string, got {type(pattern).__name__}", pattern=pattern)
    text = pattern.strip().lower()
    if text in ("unstructured", "channel"):
        return Pattern(text)
    if match := _NM.match(text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise SparsityError(
                f"N:M pattern {pattern!r} needs 0 < N < M (keep N of every M weights), e.g. '2:4'",
                pattern=pattern,
            )
        return Pattern("nm", n=n, m=m)
    if match := _BLOCK.match(text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise SparsityError(f"block pattern {pattern!r} needs positive sizes, e.g. 'block:16x16'", pattern=pattern)
        return Pattern("block", rows=rows, cols=cols)
    raise SparsityError(
        f"unknown pattern {pattern!r}; use 'unstructured', 'N:M' (e.g. '2:4'), 'block:RxC' "
        "(e.g. 'block:16x16') or 'channel'",
        pattern=pattern,
    )


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """The ``[out, rest]`` view every pattern works on."""
    return t.reshape(t.shape[0], -1) if t.dim() != 1 else t.reshape(1, -1)


def check_pattern_fits(shape: torch.Size, pattern: Pattern, name: str = "weight") -> None:
    """Raise ``SparsityError`` if ``pattern`` cannot be applied to a tensor of ``shape``."""
    if pattern.kind == "nm":
        cols = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        if cols % pattern.m:
            raise SparsityError(
                f"{name} has {cols} inputs per output, not divisible by M={pattern.m} of pattern "
                f"'{pattern}'; exclude this layer (exclude=['{name}']) or choose an M that divides {cols}",
                layer=name, shape=tuple(shape), pattern=str(pattern),
            )


def unit_scores(scores: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool element scores into the pattern's units.

    Returns ``(unit_score, unit_size)``, both 1-D: the mean score of each unit and how many
    real weights it covers (edge blocks may be partial). Used by global scope to compare
    units across layers. N:M units are single weights (N:M is decided within groups).
    """
    s2 = as_2d(scores).float()
    if pattern.kind == "channel":
        return s2.mean(dim=1), torch.full((s2.shape[0],), s2.shape[1], dtype=torch.float32)
    if pattern.kind == "block":
        sums, sizes = _block_pool(s2, pattern.rows, pattern.cols)
        return (sums / sizes).flatten(), sizes.flatten()
    flat = s2.flatten()
    return flat, torch.ones_like(flat)


def _block_pool(s2: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of scores and count of real elements per RxC block (edges zero-padded)."""
    rows, cols = s2.shape
    pr, pc = -rows % r, -cols % c
    padded = torch.nn.functional.pad(s2, (0, pc, 0, pr))
    ones = torch.nn.functional.pad(torch.ones_like(s2), (0, pc, 0, pr))
    br, bc = padded.shape[0] // r, padded.shape[1] // c
    sums = padded.reshape(br, r, bc, c).sum(dim=(1, 3))
    sizes = ones.reshape(br, r, bc, c).sum(dim=(1, 3))
    return sums, sizes


def _top_units(unit_score: torch.Tensor, unit_size: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the highest-scoring units until ``keep`` real weights are covered (closest count)."""
    order = torch.argsort(unit_score, descending=True, stable=True)
    covered = torch.cumsum(unit_size[order], dim=0)
    # number of units whose coverage is closest to `keep` (ties go to the smaller count)
    count = int(torch.searchsorted(covered, torch.tensor(float(keep)), right=True))
    if count < len(covered) and count > 0 and abs(covered[count] - keep) < abs(covered[count - 1] - keep):
        count += 1
    elif count == 0 and keep > 0 and len(covered):
        count = 1
    chosen = torch.zeros(unit_score.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    return chosen


def pattern_mask(scores: torch.Tensor, density: float, pattern: Pattern | str = "unstructured") -> torch.Tensor:
    """Boolean keep-mask of ``scores``' shape keeping a ``density`` fraction by pattern.

    Unstructured keeps the ``round(density * numel)`` highest scores (stable ties: lower index
    wins). N:M keeps the N highest of each M consecutive inputs of every output (density is n/m).
    Block keeps whole RxC blocks by mean score; channel keeps whole output rows by mean score.
    """
    pattern = parse_pattern(pattern)
    if torch.isnan(scores).any():
        raise SparsityError("scores contain NaN; check the weights/gradients for NaN before pruning")
    s2 = as_2d(scores).float()
    numel = s2.numel()
    if pattern.kind == "nm":
        check_pattern_fits(scores.shape, pattern)
        groups = s2.reshape(-1, pattern.m)
        idx = torch.topk(groups, pattern.n, dim=1, sorted=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
        return mask.reshape(scores.shape)
    keep = int(round(density * numel))
    if pattern.kind == "unstructured":
        chosen = torch.zeros(numel, dtype=torch.bool)
        if keep:
            chosen[torch.argsort(s2.flatten(), descending=True, stable=True)[:keep]] = True
        return chosen.reshape(scores.shape)
    if pattern.kind == "channel":
        unit_score, unit_size = unit_scores(s2, pattern)
        rows = _top_units(unit_score, unit_size, keep)
        return rows[:, None].expand_as(s2).reshape(scores.shape).clone()
    # block
    r, c = pattern.rows, pattern.cols
    sums, sizes = _block_pool(s2, r, c)
    blocks = _top_units((sums / sizes).flatten(), sizes.flatten(), keep).reshape(sums.shape)
    full = blocks.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full[: s2.shape[0], : s2.shape[1]].reshape(scores.shape).contiguous()


def is_valid_mask(mask: torch.Tensor, pattern: Pattern | str, input_order: torch.Tensor | None = None) -> bool:
    """True if ``mask`` (bool) follows ``pattern`` (at most N per M group, whole blocks, whole rows).

    ``input_order`` (a permutation of the inputs of the ``[out, rest]`` view, e.g. RIA's N:M channel
    permutation) checks ``mask[:, input_order]`` instead: the pattern holds in that order. An
    ``input_order`` that is not such a permutation makes the mask invalid.
    """
    pattern = parse_pattern(pattern)
    m2 = as_2d(mask)
    if mask.dtype != torch.bool:
        return False
    if input_order is not None:
        order = torch.as_tensor(input_order).flatten().to(device=m2.device)
        if order.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            return False
        if order.numel() != m2.shape[1] or not torch.equal(
                torch.sort(order.long()).values, torch.arange(m2.shape[1], device=m2.device)):
            return False
        m2 = m2[:, order.long()]
    if pattern.kind == "nm":
        if m2.shape[1] % pattern.m:
            return False
        return bool((m2.reshape(-1, pattern.m).sum(dim=1) <= pattern.n).all())
    if pattern.kind == "channel":
        return bool(((m2.all(dim=1)) | (~m2.any(dim=1))).all())
    if pattern.kind == "block":
        sums, sizes = _block_pool(m2.float(), pattern.rows, pattern.cols)
        return bool(((sums == 0) | (sums == sizes)).all())
    return True
