"""sparsetorch.shrink: pruned channels physically removed, outputs equal to the masked model's."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, SparsityWarning
from sparsetorch.models import MLP, MobileNet, ResNet, SmallCNN
from sparsetorch.shrink import find_groups, prune_channels, shrink


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlp_channel_pruned_shrinks_and_matches(assert_same_outputs):
    torch.manual_seed(0)
    model = MLP((64, 96, 80, 10))
    sparsetorch.prune(model, 0.5, pattern="channel", scope="layer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 64)
    small = shrink(model, x)
    assert small.fc1.out_features == 48 and small.fc2.in_features == 48
    assert small.fc2.out_features == 40 and small.classifier.in_features == 40
    assert small.classifier.out_features == 10
    assert_same_outputs(model, small, x)
    # the input model is untouched: same weights, masks still there
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sparsetorch.get_mask(model.fc1) is not None and sparsetorch.get_mask(small.fc1) is None


def test_removed_neuron_bias_is_folded_into_the_next_layer(assert_same_outputs):
    torch.manual_seed(0)
    model = MLP((8, 16, 4))
    with torch.no_grad():
        model.fc1.weight[:6] = 0  # neurons 0..5 output relu(bias): a constant the next layer must absorb
        model.fc1.bias[:6] = torch.linspace(-1, 1, 6)
    x = torch.randn(5, 8)
    small = shrink(model, x)
    assert small.fc1.out_features == 10
    assert_same_outputs(model, small, x)
    assert not torch.equal(small.classifier.bias, model.classifier.bias)


def test_conv_into_zero_padded_conv_keeps_constant_channels_and_says_why(assert_same_outputs):
    torch.manual_seed(0)
    model = SmallCNN(channels=8)
    with torch.no_grad():
        model.conv1.weight[:4] = 0
        model.conv1.bias[:2] = 0.5  # relu(0.5) enters conv2's zero padding: not foldable
        model.conv1.bias[2:4] = -0.5  # relu(-0.5) = 0: removable
        model.conv2.weight[:6] = 0
        model.conv2.bias[:6] = 0.3  # constant into fc (a Linear after flatten): folded
    x = torch.randn(3, 1, 8, 8)
    with pytest.warns(SparsityWarning, match="conv2 pads its input"):
        small = shrink(model, x)
    assert small.conv1.out_channels == 6 and small.conv2.in_channels == 6
    assert small.conv2.out_channels == 10 and small.fc.in_features == 10 * 16
    assert_same_outputs(model, small, x)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_resnet_residual_groups_shrink_together(scope, assert_same_outputs, params, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(ResNet(widths=(16, 32), blocks=2))
    x = torch.randn(2, 3, 8, 8)
    prune_channels(model, 0.5, example_inputs=x, scope=scope)
    small = shrink(model, x)
    assert_same_outputs(model, small, x)
    assert params(small) < 0.45 * params(model)
    # every member of the first stage's residual group has the same width
    widths = {small.stem.out_channels, small.bn.num_features, small.layers[0].conv2.out_channels,
              small.layers[1].conv2.out_channels, small.layers[0].conv1.in_channels}
    assert len(widths) == 1
    if scope == "layer":
        assert widths.pop() == 8 and small.layers[0].conv1.out_channels == 8


def test_residual_channel_zero_in_one_branch_only_is_kept(assert_same_outputs, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(ResNet(widths=(8,), blocks=1))
    with torch.no_grad():
        model.layers[0].conv2.weight[:3] = 0  # the stem still feeds these channels through the shortcut
        model.layers[0].conv1.weight[:2] = 0
        model.layers[0].bn1.weight[:2] = 0
        model.layers[0].bn1.bias[:2] = 0
    x = torch.randn(2, 3, 8, 8)
    small = shrink(model, x)
    assert small.layers[0].conv2.out_channels == 8 and small.stem.out_channels == 8
    assert small.layers[0].conv1.out_channels == 6
    assert_same_outputs(model, small, x)


def test_mobilenet_depthwise_follows_its_producer(assert_same_outputs, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(MobileNet(width=8, blocks=2))
    x = torch.randn(2, 3, 12, 12)
    prune_channels(model, 0.5, example_inputs=x, scope="layer")
    small = shrink(model, x)
    dw = small.blocks[0].depthwise[0]
    assert dw.in_channels == dw.out_channels == dw.groups == small.blocks[0].expand[0].out_channels == 16
    assert small.blocks[0].project[0].in_channels == 16
    assert_same_outputs(model, small, x)


class Branches(nn.Module):
    """Two conv branches concatenated, then a 1x1 conv: channel offsets in the consumer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.mix(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1))


def test_concatenation_maps_channels_to_consumer_offsets(assert_same_outputs):
    torch.manual_seed(0)
    model = Branches()
    with torch.no_grad():
        model.a.weight[[1, 4]] = 0
        model.a.bias[[1, 4]] = 0
        model.b.weight[[0, 3]] = 0
        model.b.bias[[0, 3]] = 0.7  # constant into a 1x1 conv without padding: folded
    x = torch.randn(2, 3, 6, 6)
    small = shrink(model, x)
    assert (small.a.out_channels, small.b.out_channels, small.mix.in_channels) == (4, 2, 6)
    assert_same_outputs(model, small, x)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(self.fc1(x))
        return self.fc3(torch.roll(self.fc2(h), 1, dims=-1))


def test_unsupported_ops_are_named_and_left_alone(assert_same_outputs):
    model = Unsupported()
    with torch.no_grad():
        model.fc1.weight[:2] = 0
        model.fc2.weight[:2] = 0
    x = torch.randn(3, 8)
    with pytest.warns(SparsityWarning) as record:
        small = shrink(model, x)
    text = " ".join(str(w.message) for w in record)
    assert "LayerNorm" in text and "roll" in text and "fc1" in text and "fc2" in text
    assert small.fc1.out_features == 8 and small.fc2.out_features == 8
    assert_same_outputs(model, small, x)


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.g(self.a(x)).mean((2, 3))


def test_grouped_conv_is_named():
    model = GroupedConv()
    with torch.no_grad():
        model.a.weight[:2] = 0
    with pytest.warns(SparsityWarning, match=r"layer g \(Conv2d\) is a grouped convolution"):
        small = shrink(model, torch.randn(1, 3, 5, 5))
    assert small.a.out_channels == 8


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_model_is_returned_unchanged_with_a_warning():
    model = DataDependent()
    with pytest.warns(SparsityWarning, match="symbolic_trace failed"):
        small = shrink(model, torch.ones(2, 4))
    assert small is not model and small.fc.out_features == 4


def test_bad_inputs():
    model = MLP((8, 16, 4))
    with pytest.raises(SparsityError, match="failed on example_inputs"):
        shrink(model, torch.randn(2, 5))
    with pytest.raises(SparsityError, match="example_inputs is required"):
        shrink(model, None)
    with pytest.raises(SparsityError, match="nn.Module"):
        shrink("model", torch.randn(2, 8))


def test_shrink_is_callable_from_the_package_and_keeps_training_mode():
    model = MLP((8, 16, 4)).train()
    small = sparsetorch.shrink(model, torch.randn(2, 8))
    assert small.training and model.training
    assert sparsetorch.shrink.prune_channels is prune_channels


def test_groups_of_a_resnet_follow_the_residuals():
    groups = find_groups(ResNet(widths=(8, 16), blocks=1).eval(), torch.randn(1, 3, 8, 8))
    stage0 = next(g for g in groups if "stem" in g.layers("out"))
    assert set(stage0.layers("out")) == {"stem", "layers.0.conv2"}
    assert {"layers.0.conv1", "layers.1.conv1", "layers.1.shortcut.0"} <= set(stage0.layers("in"))
    assert not stage0.blocked
    fc_group = next(g for g in groups if "fc" in g.layers("out"))
    assert fc_group.blocked  # model outputs are never removed


def test_save_and_load_shrunk_rebuilds_from_the_factory(tmp_path, assert_same_outputs, randomize_bn):
    from sparsetorch.shrink import load_shrunk, save_shrunk

    torch.manual_seed(0)
    model = randomize_bn(MobileNet(width=8, blocks=2))
    x = torch.randn(2, 3, 8, 8)
    prune_channels(model, 0.5, example_inputs=x)
    small = shrink(model, x)
    path = save_shrunk(small, tmp_path / "small.safetensors", metadata={"note": "half"})
    loaded = load_shrunk(path, lambda: MobileNet(width=8, blocks=2)).eval()
    assert_same_outputs(small, loaded, x)
    assert loaded.blocks[0].depthwise[0].groups == small.blocks[0].depthwise[0].groups
    # a folded bias on a layer built without one is recreated
    mlp = MLP((8, 16, 4))
    mlp.classifier.bias = None
    with torch.no_grad():
        mlp.fc1.weight[:5] = 0
    xm = torch.randn(3, 8)
    small_mlp = shrink(mlp, xm)
    assert small_mlp.classifier.bias is not None

    def factory():
        m = MLP((8, 16, 4))
        m.classifier.bias = None
        return m

    loaded = load_shrunk(save_shrunk(small_mlp, tmp_path / "mlp.safetensors"), factory)
    assert_same_outputs(small_mlp, loaded, xm)


def test_load_shrunk_rejects_wrong_files_and_factories(tmp_path):
    from sparsetorch.shrink import load_shrunk, save_shrunk

    path = save_shrunk(MLP((8, 16, 4)), tmp_path / "m.safetensors")
    with pytest.raises(SparsityError, match="does not match"):
        load_shrunk(path, lambda: SmallCNN())
    with pytest.raises(SparsityError, match="no such file"):
        load_shrunk(tmp_path / "missing.safetensors", lambda: MLP((8, 16, 4)))
    other = sparsetorch.save(MLP((8, 16, 4)), tmp_path / "plain.safetensors")
    with pytest.raises(SparsityError, match="not written by sparsetorch.shrink.save_shrunk"):
        load_shrunk(other, lambda: MLP((8, 16, 4)))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(SparsityError, match="not a readable"):
        load_shrunk(tmp_path / "bad.safetensors", lambda: MLP((8, 16, 4)))


class HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 36))  # 36 = 4 channels x 3 x 3, written out


def test_reshape_that_hard_codes_the_channel_count_blocks_it():
    model = HardCoded()
    with torch.no_grad():
        model.conv.weight[:2] = 0
    with pytest.warns(SparsityWarning, match="hard-codes"):
        small = shrink(model, torch.randn(2, 3, 3, 3))
    assert small.conv.out_channels == 4


def test_channel_pattern_pruned_resnet_shrinks_what_is_exact(assert_same_outputs, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(ResNet(widths=(8, 16), blocks=1))
    sparsetorch.prune(model, 0.5, pattern="channel", scope="layer")
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small = shrink(model, x)
    # BatchNorm shifts of zeroed filters feed zero-padded convs: those channels stay, and we say so
    assert any("cannot be folded" in str(w.message) for w in record)
    assert_same_outputs(model, small, x)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


def test_a_layer_called_twice_is_named_and_kept():
    model = Shared()
    with torch.no_grad():
        model.fc.weight[:2] = 0
    with pytest.warns(SparsityWarning, match="layer fc is called 2 times"):
        small = shrink(model, torch.randn(2, 6))
    assert small.fc.out_features == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shrink_a_cuda_model(assert_same_outputs, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(ResNet(widths=(8, 16), blocks=1)).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    prune_channels(model, 0.5, example_inputs=x, scope="layer")
    small = shrink(model, x)
    assert small.stem.weight.is_cuda and small.stem.out_channels == 4
    assert_same_outputs(model, small, x)


class ShapeReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6 * 4, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1) * 2)


def test_reading_shapes_does_not_block(assert_same_outputs):
    model = ShapeReads()
    with torch.no_grad():
        model.conv.weight[:3] = 0
    x = torch.randn(2, 3, 2, 2)
    small = shrink(model, x)
    assert small.conv.out_channels == 3 and small.fc.in_features == 12
    assert_same_outputs(model, small, x)
