"""prune_oneshot's layer choice speaks sparsetorch.prune's vocabulary; the old spellings still work, with a warning."""
import pytest
import torch

from sparsetorch.core.masks import iter_masks
from sparsetorch.models import MLP
from sparsetorch.oneshot import prune_oneshot


def _mlp_and_data(seed=0):
    torch.manual_seed(seed)
    model = MLP((64, 128, 96, 10))
    g = torch.Generator().manual_seed(seed + 1)
    return model, [torch.randn(32, 64, generator=g) for _ in range(4)]


def _pruned(**kwargs):
    model, calib = _mlp_and_data()
    model = prune_oneshot(model, calib, method="wanda", sparsity=0.5, progress=False, **kwargs)
    return model, [m.fqn for m in iter_masks(model)]


def test_default_selection_matches_prune_and_keeps_the_head_dense():
    from sparsetorch.core.layer_selection import select_targets

    _, names = _pruned()
    assert names == [t.fqn for t in select_targets(_mlp_and_data()[0])] == ["fc1", "fc2"]


def test_skip_warns_and_picks_the_same_layers_as_exclude():
    with pytest.warns(DeprecationWarning, match=r"exclude=\['\*fc2\*'\]"):
        old_model, old = _pruned(skip=["fc2"])
    new_model, new = _pruned(exclude=["*fc2*"])
    assert old == new
    for a, b in zip(old_model.parameters(), new_model.parameters()):
        assert torch.equal(a, b)


def test_keep_head_false_warns_and_equals_include_everything():
    with pytest.warns(DeprecationWarning, match="include="):
        _, old = _pruned(keep_head=False)
    _, new = _pruned(include=["*"])
    _, default = _pruned()
    assert old == new and len(new) == len(default) + 1


def test_include_uses_the_prune_glob_rule_not_substrings():
    from sparsetorch import SparsityError

    with pytest.raises(SparsityError, match="matches no Linear layer"):
        _pruned(include=["fc"])  # a bare name is a full-name glob, as in sparsetorch.prune
    _, names = _pruned(include=["fc1"])
    assert names == ["fc1"]


def test_return_stats_warns_and_stats_are_always_attached():
    model, calib = _mlp_and_data()
    with pytest.warns(DeprecationWarning, match="sparsetorch_stats"):
        out, stats = prune_oneshot(model, calib, method="wanda", return_stats=True, progress=False)
    assert out is model and model.sparsetorch_stats is stats
    model, calib = _mlp_and_data()
    assert prune_oneshot(model, calib, method="wanda", progress=False).sparsetorch_stats.layers
