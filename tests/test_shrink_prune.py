"""sparsetorch.shrink.prune_channels: criteria, scopes and FLOP/parameter targets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, SparsityWarning
from sparsetorch.models import MLP, ResNet
from sparsetorch.shrink import prune_channels, shrink



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def resnet(randomize_bn):
    return lambda: resnet_model(randomize_bn)


def resnet_model(randomize_bn):
    torch.manual_seed(0)
    return randomize_bn(ResNet(widths=(16, 32), blocks=1))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale"])
def test_criteria_prune_and_shrink_exactly(criterion, assert_same_outputs, params, resnet):
    model = resnet()
    prune_channels(model, 0.4, criterion=criterion, example_inputs=X)
    small = shrink(model, X)
    assert params(small) < params(model)
    assert_same_outputs(model, small, X)


def test_l1_removes_the_weakest_channels_in_layer_scope():
    torch.manual_seed(0)
    model = MLP((8, 6, 3))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.arange(6.0)[:, None].expand(6, 8) + 1)
    prune_channels(model, 0.5, example_inputs=torch.randn(2, 8), scope="layer")
    assert sparsetorch.get_mask(model.fc1)[:, 0].tolist() == [False] * 3 + [True] * 3
    assert sparsetorch.get_mask(model.fc1, "bias").tolist() == [False] * 3 + [True] * 3


def test_taylor_uses_gradients_and_is_deterministic(assert_same_outputs, resnet):
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
    a, b = resnet(), resnet()
    prune_channels(a, 0.5, criterion="taylor", example_inputs=X, batch=batch)
    prune_channels(b, 0.5, criterion="taylor", example_inputs=X, batch=batch)
    masks_a = [m.mask for m in sparsetorch.iter_masks(a)]
    assert all(torch.equal(x.mask, y) for x, y in zip(sparsetorch.iter_masks(b), masks_a))
    l1 = resnet()
    prune_channels(l1, 0.5, criterion="l1", example_inputs=X)
    assert any(not torch.equal(x.mask, y.mask) for x, y in zip(sparsetorch.iter_masks(l1), sparsetorch.iter_masks(a)))
    assert_same_outputs(a, shrink(a, X), X)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_target_params_is_met(scope, params, resnet):
    model = resnet()
    full = params(model)
    prune_channels(model, target_params=0.5, example_inputs=X, scope=scope)
    small = shrink(model, X)
    assert 0.35 * full < params(small) <= 0.5 * full


def test_target_flops_is_met_as_report_counts_them(resnet):
    model = resnet()
    full = sparsetorch.report(model, X).total.dense_flops
    prune_channels(model, target_flops=0.4, example_inputs=X)
    small = shrink(model, X)
    after = sparsetorch.report(small, X).total.dense_flops
    assert 0.25 * full < after <= 0.4 * full


def test_bad_arguments_change_nothing(resnet):
    model = resnet()
    with pytest.raises(SparsityError, match="exactly one"):
        prune_channels(model, 0.5, target_flops=0.5, example_inputs=X)
    with pytest.raises(SparsityError, match="exactly one"):
        prune_channels(model, example_inputs=X)
    with pytest.raises(SparsityError, match="unknown criterion"):
        prune_channels(model, 0.5, criterion="l3", example_inputs=X)
    with pytest.raises(SparsityError, match="needs batch"):
        prune_channels(model, 0.5, criterion="taylor", example_inputs=X)
    with pytest.raises(SparsityError, match=r"sparsity must lie in \[0, 1\)"):
        prune_channels(model, 1.5, example_inputs=X)
    with pytest.raises(SparsityError, match="failed on example_inputs"):
        prune_channels(model, 0.5, example_inputs=torch.randn(2, 5))
    with pytest.raises(SparsityError, match="cannot be reached"):
        prune_channels(model, target_params=10, example_inputs=X)
    assert not list(sparsetorch.iter_masks(model))


def test_bn_scale_without_batchnorm_is_an_error():
    with pytest.warns(SparsityWarning, match="no BatchNorm"), pytest.raises(SparsityError, match="bn_scale"):
        prune_channels(MLP((8, 16, 4)), 0.5, criterion="bn_scale", example_inputs=torch.randn(2, 8))


def test_looking_at_a_training_model_leaves_batchnorm_statistics_alone(resnet):
    model = resnet().train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    prune_channels(model, 0.3, example_inputs=X)
    shrink(model, X)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_ratio_is_the_deprecated_name_of_sparsity():
    import copy

    X = torch.randn(4, 8)
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    b = copy.deepcopy(a)
    prune_channels(a, sparsity=0.5, example_inputs=X)
    with pytest.warns(DeprecationWarning, match="sparsity="):
        prune_channels(b, ratio=0.5, example_inputs=X)
    from sparsetorch.core.masks import iter_masks

    masks_a, masks_b = list(iter_masks(a)), list(iter_masks(b))
    assert masks_a and [m.qualified_name for m in masks_a] == [m.qualified_name for m in masks_b]
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(masks_a, masks_b))
    with pytest.raises(SparsityError, match="sparsity= only"):
        prune_channels(b, 0.5, ratio=0.5, example_inputs=X)
