"""Property-based tests of the pure pattern and distribution functions."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetorch.core import distributions
from sparsetorch.core.patterns import is_valid_mask, parse_pattern, pattern_mask

shapes = st.lists(st.integers(1, 40), min_size=2, max_size=4).map(tuple)
densities = st.floats(0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, density=densities, seed=st.integers(0, 2**16))
def test_unstructured_keeps_exact_count(shape, density, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    mask = pattern_mask(scores, density, "unstructured")
    assert int(mask.sum()) == round(density * scores.numel())
    if 0 < mask.sum() < mask.numel():  # every kept score beats every pruned one
        assert scores[mask].min() >= scores[~mask].max()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), groups=st.integers(1, 10), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 7)]),
       seed=st.integers(0, 2**16))
def test_nm_exactly_n_per_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = pattern_mask(scores, 0.0, f"{n}:{m}")
    assert torch.all(mask.reshape(-1, m).sum(1) == n)
    assert is_valid_mask(mask, f"{n}:{m}")


@settings(max_examples=60, deadline=None)
@given(shape=shapes, density=densities, r=st.integers(1, 5), c=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_block_and_channel_are_whole_units(shape, density, r, c, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    for pattern, unit in ((f"block:{r}x{c}", r * c), ("channel", math.prod(shape[1:]))):
        mask = pattern_mask(scores, density, pattern)
        assert is_valid_mask(mask, pattern)
        assert abs(int(mask.sum()) - density * scores.numel()) <= unit  # closest whole-unit count


@settings(max_examples=80, deadline=None)
@given(layer_shapes=st.lists(st.lists(st.integers(1, 300), min_size=2, max_size=4).map(tuple), min_size=1, max_size=6),
       density=st.floats(0.001, 1.0), name=st.sampled_from(["uniform", "er", "erk"]))
def test_distributions_meet_budget(layer_shapes, density, name):
    ds = getattr(distributions, name)(layer_shapes, density)
    sizes = [math.prod(s) for s in layer_shapes]
    assert all(-1e-12 <= d <= 1 + 1e-12 for d in ds)
    assert sum(d * n for d, n in zip(ds, sizes)) == pytest.approx(density * sum(sizes), rel=1e-6, abs=1e-6)


def test_erk_gives_small_layers_more_density_and_redistributes():
    shapes = [(8, 3, 3, 3), (256, 256, 3, 3), (10, 256)]
    ds = distributions.erk(shapes, 0.1)
    assert ds[0] == 1.0  # would exceed 1: made dense, its budget moved to the others
    assert ds[2] > ds[1]
    assert sum(d * math.prod(s) for d, s in zip(ds, shapes)) == pytest.approx(0.1 * sum(math.prod(s) for s in shapes))


def test_er_ignores_kernel_size_erk_does_not():
    shapes = [(64, 64, 3, 3), (64, 64, 1, 1)]
    er, erk = distributions.er(shapes, 0.2), distributions.erk(shapes, 0.2)
    assert er[0] == pytest.approx(er[1])
    assert erk[1] > erk[0]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=5), density=st.floats(0.01, 0.99),
       floor=st.floats(0.0, 0.01), seed=st.integers(0, 2**16))
def test_global_densities_budget_and_floor(sizes, density, floor, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) * (i + 1) for i, n in enumerate(sizes)]
    ds = distributions.global_densities(scores, [torch.ones(n) for n in sizes], density, floor)
    assert all(d >= floor - 1e-12 and d <= 1 + 1e-12 for d in ds)
    kept = sum(d * n for d, n in zip(ds, sizes))
    assert abs(kept - density * sum(sizes)) <= len(sizes) + 1 or min(ds) == pytest.approx(floor)


def test_parse_pattern_round_trips():
    for text in ["unstructured", "2:4", "4:8", "block:16x16", "channel"]:
        assert str(parse_pattern(text)) == text
    assert parse_pattern(" 2 : 4 ").fixed_density == 0.5
