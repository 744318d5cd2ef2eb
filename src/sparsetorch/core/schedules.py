"""Schedules of sparse training as pure functions of the step (or round) number.

Every function returns a float and never touches a model, so a schedule can be plotted,
tested and reasoned about on its own. ``check_window`` / ``check_every`` / ``check_fraction``
validate the hyperparameters the sparsifiers share.
"""
from __future__ import annotations

import math

from ..errors import SparsityError

__all__ = ["cubic", "cosine_decay", "exponential", "constant", "check_window", "check_every", "check_fraction"]


def cubic(step: int, *, initial: float, final: float, start: int, end: int, every: int = 1) -> float:
    """Sparsity at ``step`` ramping from ``initial`` at ``start`` to ``final`` at ``end``.

    Zhu & Gupta 2017, eq. 1: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3, with t held at
    the last pruning step (a multiple of ``every`` after ``start``): pruning is fast early, when
    there are many redundant weights, and slow near the end.
    """
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    t = start + ((step - start) // every) * every
    progress = (t - start) / (end - start)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def cosine_decay(step: int, *, initial: float, end: int) -> float:
    """The update fraction at ``step``: ``initial`` decayed to 0 at ``end`` by half a cosine.

    Evci et al. 2020 (RigL), eq. 1: f(t) = alpha/2 * (1 + cos(pi * t / T_end)); 0 after ``end``.
    """
    if step >= end:
        return 0.0
    return float(initial / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / end)))


def exponential(round_: int, *, rounds: int, final: float) -> float:
    """Sparsity after ``round_`` of ``rounds`` pruning rounds reaching ``final``.

    Tanaka et al. 2020 (SynFlow): the kept fraction shrinks geometrically, density_k =
    (1 - final)^(k / rounds), so every round removes the same fraction of what is left.
    """
    if round_ >= rounds:
        return float(final)
    return float(1.0 - (1.0 - final) ** (max(round_, 0) / rounds))


def constant(step: int, *, value: float) -> float:
    """The same value at every step (a static sparsity, or a fixed update fraction)."""
    return float(value)


def check_window(start: int, end: int, what: str = "schedule") -> tuple[int, int]:
    """Validate ``start < end`` (both non-negative integers) and return them."""
    try:
        start_i, end_i = int(start), int(end)
    except (TypeError, ValueError):
        raise SparsityError(f"{what} start/end must be integers, got start={start!r}, end={end!r}") from None
    if start_i < 0 or end_i <= start_i:
        raise SparsityError(
            f"{what} ends before it starts (start={start}, end={end}); pass 0 <= start < end, e.g. start=0, end=1000",
            start=start, end=end,
        )
    return start_i, end_i


def check_every(every: int, what: str = "update frequency 'every'") -> int:
    """Validate a positive step interval and return it."""
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise SparsityError(f"{what} must be a positive integer number of steps, got {every!r}; e.g. every=100",
                            every=every)
    return every


def check_fraction(fraction: float, what: str = "drop_fraction") -> float:
    """Validate a fraction strictly between 0 and 1 and return it as a float."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise SparsityError(f"{what} must be a number in (0, 1), got {fraction!r}") from None
    if not 0.0 < value < 1.0:
        raise SparsityError(f"{what} must lie strictly between 0 and 1, got {value}; e.g. 0.3 moves 30% of the "
                            "kept connections per update", **{what: fraction})
    return value
