"""One-shot pruning (SparseGPT, Wanda, magnitude) on plain modules and single layers."""
import math

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.core.masks import get_mask, iter_masks
from sparsetorch.models import MLP
from sparsetorch.oneshot import prune_oneshot, sparsegpt_solve
from sparsetorch.core.patterns import is_valid_mask, parse_pattern


def _mlp_and_data(seed=0):
    torch.manual_seed(seed)
    model = MLP((64, 128, 96, 10))
    g = torch.Generator().manual_seed(seed + 1)
    return model, [torch.randn(32, 64, generator=g) for _ in range(4)]


def _correlated(n, d, g):
    """Inputs with strongly correlated features (a low-rank mix plus noise), like real activations."""
    mix = torch.randn(d // 4, d, generator=g)
    return torch.randn(n, d // 4, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)  # [n, d]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_exact_sparsity_per_layer_and_head_kept_dense(method, sparsity):
    model, calib = _mlp_and_data()
    prune_oneshot(model, calib, method=method, sparsity=sparsity, progress=False)
    masks = {m.fqn: m.mask for m in iter_masks(model)}
    assert set(masks) == {"fc1", "fc2"}  # the classifier stays dense
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight
        assert (~mask).sum().item() == round(sparsity * mask.numel())
        assert torch.all(weight[~mask] == 0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_groups_valid(method, pattern):
    model, calib = _mlp_and_data()
    prune_oneshot(model, calib, method=method, pattern=pattern, sparsity=None, progress=False)
    pat = parse_pattern(pattern)
    for item in iter_masks(model):
        assert is_valid_mask(item.mask, pat)
        groups = item.mask.reshape(-1, pat.m).sum(dim=1)
        assert torch.all(groups == pat.n)  # exactly N kept per group


def _recon_error(W, W_new, X):
    return ((X @ W.T - X @ W_new.T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstruction_beats_magnitude(pattern):
    g = torch.Generator().manual_seed(0)
    X = _correlated(2048, 128, g)  # [n, in]
    layer = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 128, generator=g))
    W = layer.weight.detach().clone()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        copy = nn.Linear(128, 64, bias=False)
        copy.load_state_dict(layer.state_dict())
        prune_oneshot(copy, [X], method=method, pattern=pattern, sparsity=0.5, include=["*"], progress=False)
        errors[method] = _recon_error(W, copy.weight.detach(), X)
    assert errors["sparsegpt"] < 0.6 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_wanda_equals_row_magnitude_when_input_norms_are_equal():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 2, (256, 64), generator=g).float() * 2 - 1  # +-1: every column has norm sqrt(256)
    a, b = nn.Linear(64, 32), nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    prune_oneshot(a, [X], method="wanda", sparsity=0.5, include=["*"], progress=False)
    prune_oneshot(b, None, method="magnitude", scope="row", sparsity=0.5, include=["*"], progress=False)
    assert torch.equal(get_mask(a), get_mask(b))


def test_sparsegpt_survives_dead_inputs_and_singular_hessians():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 64, generator=g)  # 8 samples for 64 inputs: rank 8, singular
    X[:, :10] = 0  # dead inputs
    W = torch.randn(16, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    for damp in (0.0, 0.01):
        new_w, keep, _ = sparsegpt_solve(W, H, 0.5, parse_pattern("unstructured"), block_size=16, damp=damp)
        assert torch.isfinite(new_w).all()
        assert (~keep).sum().item() == W.numel() // 2
        assert torch.all(new_w[~keep] == 0)
    zero_h = torch.zeros(64, 64)
    new_w, keep, _ = sparsegpt_solve(W, zero_h, 0.5, parse_pattern("2:4"))
    assert torch.isfinite(new_w).all() and is_valid_mask(keep, "2:4")


def test_pruned_model_stays_sparse_when_fine_tuned():
    model, calib = _mlp_and_data()
    sparsetorch.sparsegpt(model, calib, sparsity=0.5, progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x in calib:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for item in iter_masks(model):
        assert torch.all(item.param[~item.mask] == 0)


def test_per_layer_sparsity_globs_skip_and_stats():
    model, calib = _mlp_and_data()
    stats = prune_oneshot(model, calib, method="wanda", sparsity={"fc1": 0.25, "*": 0.75}, progress=False).sparsetorch_stats
    got = {r.name: r.sparsity for r in stats.layers}
    assert got == pytest.approx({"fc1": 0.25, "fc2": 0.75})
    assert stats.mode == "one-pass" and stats.seconds > 0 and stats.peak_memory_mb > 0
    model, calib = _mlp_and_data()
    prune_oneshot(model, calib, method="sparsegpt", exclude=["fc2"], progress=False)
    assert [m.fqn for m in iter_masks(model)] == ["fc1"]


def test_deterministic():
    results = []
    for _ in range(2):
        model, calib = _mlp_and_data()
        prune_oneshot(model, calib, method="sparsegpt", progress=False)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


def _untouched(model, before):
    return not list(iter_masks(model)) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["empty", "wrong_shape", "no_linear", "nm_not_dividing", "bad_sparsity",
                                  "bad_method", "not_iterable", "dict_no_key"])
def test_bad_input_raises_and_leaves_model_untouched(case):
    model, calib = _mlp_and_data()
    kwargs = dict(method="sparsegpt", progress=False)
    if case == "empty":
        calib = []
    elif case == "wrong_shape":
        calib = [torch.randn(4, 63)]
    elif case == "no_linear":
        model = _NoLinear()
    elif case == "nm_not_dividing":
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        calib, kwargs["pattern"] = [torch.randn(4, 6)], "4:8"
    elif case == "bad_sparsity":
        kwargs["sparsity"] = 1.5
    elif case == "bad_method":
        kwargs["method"] = "obs"
    elif case == "not_iterable":
        calib = 3
    elif case == "dict_no_key":
        kwargs["sparsity"] = {"fc1": 0.5}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsityError):
        prune_oneshot(model, calib, **kwargs)
    assert _untouched(model, before)


def test_wanda_and_sparsegpt_are_thin_wrappers():
    a, calib = _mlp_and_data()
    b, _ = _mlp_and_data()
    sparsetorch.wanda(a, calib, sparsity=0.5, pattern="2:4", progress=False)
    prune_oneshot(b, calib, method="wanda", pattern="2:4", progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert math.isclose(1 - get_mask(a.fc1).float().mean().item(), 0.5)


def test_byte_gpt_pruned_block_by_block_on_stdlib_text():
    from sparsetorch.data.text import load_stdlib_text, random_windows
    from sparsetorch.models.gpt import GPT, GPTConfig

    split = load_stdlib_text(max_bytes=200_000)
    again = load_stdlib_text(max_bytes=200_000)
    assert torch.equal(split.train, again.train) and torch.equal(split.val, again.val)  # deterministic split
    assert split.val.numel() > 0 and split.train.numel() > split.val.numel()
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, width=32, heads=2, context=32)).eval()
    calib = list(random_windows(split.train, 8, 32, torch.Generator().manual_seed(0)))
    stats = prune_oneshot(model, calib, method="sparsegpt", pattern="2:4", sparsity=None,
                             progress=False).sparsetorch_stats
    assert stats.mode == "sequential" and stats.blocks == 2 and stats.sparsity == pytest.approx(0.5)
    assert [m.fqn for m in iter_masks(model)][:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc",
                                                      "blocks.0.mlp.proj"]
    assert get_mask(model.lm_head) is None
    assert torch.isfinite(model.loss(random_windows(split.val, 4, 33, torch.Generator().manual_seed(1)))).all()
    with pytest.raises(SparsityError):
        prune_oneshot(GPT(GPTConfig(layers=1, width=32, heads=2, context=32)), [torch.full((4,), 300)],
                      method="wanda")


class _SameInputTwice(nn.Module):
    """``a`` and ``b`` read the very same tensor (like q/k/v); ``c`` reads ``a``'s output; ``d`` reads the input
    only when asked, and ``a`` then a second, different tensor (a run whose layers stop sharing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x, split=False):
        y = self.a(x)
        self.b(x)
        if split:
            self.a(y)
        else:
            self.d(x)
        return self.c(y)


def test_layers_fed_the_same_input_share_statistics_bitwise():
    """One InputStats for a run of layers called on the very same tensor (X^T X held once); once their calls
    differ each continues from an exact copy: the sums are bitwise those of one accumulator per layer."""
    from sparsetorch.core.distributed import is_distributed
    from sparsetorch.oneshot.linear_layers import InputStats, attach_stats

    assert not is_distributed()
    torch.manual_seed(0)
    net = _SameInputTwice()
    layers = {n: getattr(net, n) for n in "abcd"}
    xs = [torch.randn(5, 6) for _ in range(4)]
    stats, handles = attach_stats(layers, torch.device("cpu"), hessian=True)
    with torch.no_grad():
        net(xs[0])
        net(xs[1])
        shared = stats["a"] is stats["b"] is stats["d"] and stats["a"].layers == 3  # one X^T X for the three
        net(xs[2], split=True)  # a, b no longer see the same tensors; d is not called
        net(xs[3])
    for h in handles:
        h.remove()
    assert shared and list(stats) == list("abcd")
    assert len({id(stats[n]) for n in "abd"}) == 3  # split apart, each with its own history
    expected = {n: InputStats(6, torch.device("cpu"), True) for n in "abcd"}  # one per layer, by hand
    with torch.no_grad():
        for i, x in enumerate(xs):
            y = net.a(x)
            expected["a"].add(x)
            expected["b"].add(x)
            expected["c"].add(y)
            if i == 2:
                expected["a"].add(y)
            else:
                expected["d"].add(x)
    for n in "abcd":
        assert stats[n].count == expected[n].count, n
        for key, total in expected[n].totals.items():
            assert torch.equal(stats[n].totals[key], total), (n, key)
    # two layers reading one InputStats: the first takes a copy, the last the statistics themselves
    stats2, handles2 = attach_stats({"a": net.a, "b": net.b}, torch.device("cpu"), hessian=True)
    with torch.no_grad():
        net(xs[0])
    for h in handles2:
        h.remove()
    one = stats2["a"]
    assert one is stats2["b"] and one.layers == 2
    first, last = one.take_hessian(), one.take_hessian()
    assert torch.equal(first, last) and first.data_ptr() != last.data_ptr() and not one.has_hessian
