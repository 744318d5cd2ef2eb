"""Every registered score x pattern x scope meets the same contract."""
import copy
import itertools

import pytest
import torch

import sparsetorch
from sparsetorch.core.masks import iter_masks
from sparsetorch.core.patterns import is_valid_mask
from sparsetorch.core.scores import SCORES
from sparsetorch.core.layer_selection import select_targets

PATTERNS = ["unstructured", "2:4", "block:4x4", "block:2x3", "channel"]
CASES = list(itertools.product(sorted(SCORES), PATTERNS, ["layer", "global"]))


def _prune(model, method, pattern, scope, batch, seed=0, sparsity=0.75):
    kwargs = dict(method=method, pattern=pattern, scope=scope, generator=torch.Generator().manual_seed(seed))
    if method == "gradient":
        kwargs["batch"] = batch
    if pattern == "2:4":
        sparsity = None
    return sparsetorch.prune(model, sparsity, **kwargs)


def _eligible(model, pattern):
    return None if pattern != "2:4" else ["fc1", "fc2", "conv"]  # conv1d has 16 inputs: fine too


@pytest.mark.parametrize("method,pattern,scope", CASES)
def test_contract(tiny_net, tiny_batch, method, pattern, scope):
    model = _prune(tiny_net, method, pattern, scope, tiny_batch)
    masks = list(iter_masks(model))
    assert [m.qualified_name for m in masks] == [t.qualified_name for t in select_targets(model)]
    kept = sum(int(m.mask.sum()) for m in masks)
    total = sum(m.mask.numel() for m in masks)
    target = 0.5 if pattern == "2:4" else 0.25
    unit = {"channel": 48, "block:4x4": 16, "block:2x3": 6}.get(pattern, 1)  # rounding happens in whole units
    assert abs(kept - target * total) <= unit * len(masks), (kept, target * total)
    for m in masks:
        assert m.mask.dtype == torch.bool
        assert is_valid_mask(m.mask, pattern)
        assert torch.all(m.param[~m.mask] == 0)


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("random", "2:4"), ("gradient", "block:4x4")])
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, 1e-2),
    lambda p: torch.optim.AdamW(p, 1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, nesterov=True),
], ids=["adam", "adamw", "sgd-momentum-wd", "sgd-nesterov"])
def test_pruned_weights_stay_zero(tiny_net, tiny_batch, method, pattern, make_opt):
    x, y = tiny_batch
    opt = make_opt(tiny_net.parameters())
    for _ in range(3):  # optimizer state exists before pruning: it must be zeroed
        torch.nn.functional.cross_entropy(tiny_net(x), y).backward()
        opt.step()
        opt.zero_grad()
    _prune(tiny_net, method, pattern, "layer", tiny_batch)
    for _ in range(20):
        torch.nn.functional.cross_entropy(tiny_net(x), y).backward()
        opt.step()
        opt.zero_grad()
    for m in iter_masks(tiny_net):
        assert torch.all(m.param[~m.mask] == 0)
        for state in opt.state[m.param].values():
            if isinstance(state, torch.Tensor) and state.shape == m.param.shape:
                assert torch.all(state[~m.mask] == 0)
        assert m.param[m.mask].abs().sum() > 0


def test_gradients_of_pruned_entries_are_zero(tiny_net, tiny_batch):
    sparsetorch.prune(tiny_net, 0.8)
    x, y = tiny_batch
    torch.nn.functional.cross_entropy(tiny_net(x), y).backward()
    for m in iter_masks(tiny_net):
        assert torch.all(m.param.grad[~m.mask] == 0)


@pytest.mark.parametrize("method,pattern,scope", CASES)
def test_save_load_round_trip(tiny_net, tiny_batch, tmp_path, method, pattern, scope):
    model = _prune(tiny_net, method, pattern, scope, tiny_batch)
    fresh = copy.deepcopy(model)
    sparsetorch.remove_masks(fresh)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    sparsetorch.load(fresh, sparsetorch.save(model, tmp_path / "m.safetensors"))
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert {m.qualified_name: m.mask for m in iter_masks(model)}.keys() == {
        m.qualified_name: m.mask for m in iter_masks(fresh)}.keys()
    for a, b in zip(iter_masks(model), iter_masks(fresh)):
        assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("method,pattern", [(m, p) for m in sorted(SCORES) for p in PATTERNS])
def test_same_seed_same_masks(tiny_batch, tiny_net_class, method, pattern):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _prune(tiny_net_class(), method, pattern, "global", tiny_batch, seed=7)
        results.append([m.mask.clone() for m in iter_masks(model)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_different_seed_different_random_masks(tiny_net):
    a = _prune(copy.deepcopy(tiny_net), "random", "unstructured", "layer", None, seed=1)
    b = _prune(copy.deepcopy(tiny_net), "random", "unstructured", "layer", None, seed=2)
    assert any(not torch.equal(x.mask, y.mask) for x, y in zip(iter_masks(a), iter_masks(b)))


def test_state_dict_stays_plain(tiny_net):
    keys = set(tiny_net.state_dict())
    sparsetorch.prune(tiny_net, 0.5)
    assert set(tiny_net.state_dict()) == keys
    dense = type(tiny_net)()
    dense.load_state_dict(tiny_net.state_dict())  # any dense code path loads ours
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), tiny_net.state_dict().values()))


def test_repruning_is_monotone(tiny_net):
    sparsetorch.prune(tiny_net, 0.5, method="random", generator=torch.Generator().manual_seed(0))
    first = [m.mask.clone() for m in iter_masks(tiny_net)]
    sparsetorch.prune(tiny_net, 0.8, method="random", generator=torch.Generator().manual_seed(1))
    for old, new in zip(first, iter_masks(tiny_net)):
        assert not torch.any(new.mask & ~old)


def test_remove_masks_makes_it_permanent(tiny_net, tiny_batch):
    sparsetorch.prune(tiny_net, 0.7)
    zeros = sum(int((p == 0).sum()) for p in tiny_net.parameters())
    sparsetorch.remove_masks(tiny_net)
    assert not list(iter_masks(tiny_net))
    assert sum(int((p == 0).sum()) for p in tiny_net.parameters()) == zeros
    x, y = tiny_batch
    torch.nn.functional.cross_entropy(tiny_net(x), y).backward()
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in tiny_net.parameters())


# ---- every registered training-time method and storage format, through sparsetorch.testing -----------------
from sparsetorch import testing  # noqa: E402
from sparsetorch.formats import FORMATS  # noqa: E402
from sparsetorch.sparsifiers import METHODS, LotteryTicket, Sparsifier  # noqa: E402
from sparsetorch.sparsifiers.method_registry import NEEDS_BATCH, NEEDS_INPUTS  # noqa: E402


def registry_factory(name):
    def make(generator):
        kwargs = {"generator": generator}
        if name in NEEDS_BATCH:
            kwargs["batch"] = testing.default_batch(-1)
        if name in NEEDS_INPUTS:
            kwargs["example_inputs"] = testing.default_batch(-1)[0]
        return METHODS[name](**kwargs)
    return make


def next_round_twice(step, sparsifier):
    if isinstance(sparsifier, LotteryTicket) and step in (5, 11):  # two rounds inside the run
        sparsifier.next_round()


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_conforms(name, check):
    testing.check_sparsifier(registry_factory(name), prepare=METHODS[name].prepare, on_step=next_round_twice,
                             steps=20 if check is testing.check_target_density else 12, checks=[check])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_registered_format_conforms(name):
    testing.check_format(name, pattern="block:4x4" if name == "bsr" else "unstructured")


class RevivesPrunedWeights(Sparsifier):
    """Broken on purpose: masks half the weights, then writes into the weights behind the masks' back."""

    sparsity = 0.5

    def initial_masks(self):
        return [torch.rand(t.param.shape, generator=self.generator) < 0.5 for t in self.targets]

    @torch.no_grad()
    def update(self, step):
        for t in self.targets:
            t.param.add_(0.01)


def test_broken_user_sparsifier_fails_check_sparsifier():
    with pytest.raises(AssertionError, match="pruned weights|masks"):
        testing.check_sparsifier(lambda g: RevivesPrunedWeights(generator=g),
                                 checks=[testing.check_pruned_stay_zero])


def test_broken_format_fails_check_format():
    from sparsetorch.formats import Format, register_format

    dense = FORMATS["dense"]

    def lossy_decode(parts, meta):  # broken on purpose: rounds the weights
        w, mask = dense.decode(parts, meta)
        return w.half().to(w.dtype), mask

    broken = register_format(Format("broken-for-test", dense.encode, lossy_decode, dense.needs_mask))
    try:
        with pytest.raises(AssertionError, match="broken-for-test"):
            testing.check_format(broken)
    finally:
        FORMATS.pop("broken-for-test")
