"""Schedules are pure functions with the endpoints and shapes their papers define."""
import math

import pytest

from sparsetorch.core import schedules
from sparsetorch.errors import SparsityError


def test_cubic_endpoints_monotone_and_fast_early():
    kw = dict(initial=0.0, final=0.9, start=10, end=110, every=10)
    values = [schedules.cubic(t, **kw) for t in range(0, 130)]
    assert values[0] == 0.0 and values[10] == 0.0 and values[110] == 0.9 and values[129] == 0.9
    assert all(b >= a for a, b in zip(values, values[1:]))
    # held between pruning steps
    assert values[21] == values[20] == values[29]
    # Zhu-Gupta: half way through, 1 - (1/2)^3 = 87.5% of the ramp is done
    assert values[60] == pytest.approx(0.9 * (1 - 0.5 ** 3))


def test_cosine_decay():
    assert schedules.cosine_decay(0, initial=0.3, end=100) == pytest.approx(0.3)
    assert schedules.cosine_decay(50, initial=0.3, end=100) == pytest.approx(0.15)
    assert schedules.cosine_decay(100, initial=0.3, end=100) == 0.0
    assert schedules.cosine_decay(500, initial=0.3, end=100) == 0.0


def test_exponential_removes_same_fraction_each_round():
    densities = [1 - schedules.exponential(k, rounds=4, final=0.9375) for k in range(5)]
    assert densities == pytest.approx([1, 0.5, 0.25, 0.125, 0.0625])
    assert schedules.exponential(9, rounds=4, final=0.9375) == 0.9375


def test_constant():
    assert schedules.constant(12345, value=0.3) == 0.3


@pytest.mark.parametrize("start,end", [(10, 10), (10, 5), (-1, 5), ("a", 5)])
def test_window_that_ends_before_it_starts(start, end):
    with pytest.raises(SparsityError, match="start"):
        schedules.check_window(start, end)


@pytest.mark.parametrize("every", [0, -3, 1.5, True, None])
def test_bad_every(every):
    with pytest.raises(SparsityError, match="positive integer"):
        schedules.check_every(every)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, "x"])
def test_bad_fraction(fraction):
    with pytest.raises(SparsityError):
        schedules.check_fraction(fraction)
