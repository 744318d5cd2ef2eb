"""Bad input gives SparsityError with a helpful message, and the model is unchanged."""
import copy

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.core.masks import iter_masks


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(sparsity=1.0), "[0, 1)"),
    (dict(sparsity=-0.1), "[0, 1)"),
    (dict(sparsity=float("nan")), "[0, 1)"),
    (dict(sparsity="lots"), "number"),
    (dict(pattern="4:2"), "0 < N < M"),
    (dict(pattern="2:2"), "0 < N < M"),
    (dict(pattern="diagonal"), "unknown pattern"),
    (dict(pattern="block:0x4"), "positive"),
    (dict(method="oracle"), "unknown method"),
    (dict(scope="model"), "unknown scope"),
    (dict(include=["nothing.*"]), "matches no module"),
    (dict(pattern="2:4", sparsity=0.9), "fixes sparsity"),
    (dict(pattern="2:5", include=[nn.Linear]), "not divisible by M=5"),
    (dict(scope="layer", distribution="zipf"), "unknown distribution"),
    (dict(method="gradient"), "needs batch"),
])
def test_bad_arguments(tiny_net, kwargs, fragment):
    before = copy.deepcopy(tiny_net)
    with pytest.raises(SparsityError, match=None) as info:
        sparsetorch.prune(tiny_net, **kwargs)
    assert fragment in str(info.value)
    assert _same(before, tiny_net)
    assert not list(iter_masks(tiny_net))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tiny_net, bad):
    with torch.no_grad():
        tiny_net.fc2.weight[0, 0] = bad
    with pytest.raises(SparsityError, match="fc2.weight contains NaN or inf"):
        sparsetorch.prune(tiny_net, 0.5)
    assert not list(iter_masks(tiny_net))


def test_model_without_prunable_layers():
    with pytest.raises(SparsityError, match="no layer to prune"):
        sparsetorch.prune(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5)


def test_not_a_module():
    with pytest.raises(SparsityError, match="nn.Module"):
        sparsetorch.prune("model", 0.5)


def test_error_carries_context(tiny_net):
    with pytest.raises(SparsityError) as info:
        sparsetorch.prune(tiny_net, 1.5)
    assert info.value.context["sparsity"] == 1.5
    assert isinstance(info.value, ValueError)  # catchable as the builtin too


def test_mask_shape_mismatch():
    layer = nn.Linear(4, 3)
    with pytest.raises(SparsityError, match="does not match"):
        sparsetorch.set_mask(layer, torch.ones(4, 3, dtype=torch.bool))
