"""Conformance of every training-time method in the registry, and bad input."""
import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.errors import SparsityError
from sparsetorch.models import MLP
from sparsetorch.sparsifiers import METHODS, make_sparsifier
from sparsetorch.sparsifiers.common import rows_cols
from sparsetorch.sparsifiers.method_registry import MASKED

SIZES = (16, 48, 32, 4)  # the MLP of conftest.setup


def tolerance(sparsifier):
    """Rounding slack: half a weight per layer, or half a unit's row per layer for constant fan-in."""
    total = sum(t.param.numel() for t in sparsifier.targets)
    if type(sparsifier).__name__ == "SRigL":
        return max(rows_cols(t.param.shape)[0] for t in sparsifier.targets) / total
    return len(sparsifier.targets) / total


@pytest.mark.parametrize("opt", ["adam", "sgd"])  # OPTIMIZERS in conftest.py
@pytest.mark.parametrize("name", sorted(MASKED))  # compressed ones: test_conformance.py
def test_target_reached_masks_binary_pruned_stay_zero(name, opt, setup, train):
    model, optimizer, sparsifier = setup(name, opt)

    def check(step):
        for item in sparsetorch.iter_masks(model):
            assert item.mask.dtype == torch.bool
            assert torch.count_nonzero(item.param[~item.mask]) == 0, (name, step, item.qualified_name)

    train(model, optimizer, sparsifier, 20, check)
    assert abs(sparsifier.density() - 0.1) <= tolerance(sparsifier), (name, sparsifier.density())
    # the optimizer holds no momentum for pruned weights either
    for t in sparsifier.targets:
        mask = sparsetorch.get_mask(t.module, t.name)
        for value in optimizer.state[t.param].values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert torch.count_nonzero(value[~mask]) == 0


@pytest.mark.parametrize("name", sorted(MASKED))  # compressed ones: test_conformance.py
def test_state_dict_round_trip(name, setup, train):
    model, optimizer, sparsifier = setup(name)
    train(model, optimizer, sparsifier, 12)
    state = sparsifier.state_dict()
    model2, optimizer2, sparsifier2 = setup(name, model_seed=1, seed=5)
    sparsifier2.load_state_dict(state)
    for a, b in zip(sparsetorch.iter_masks(model), sparsetorch.iter_masks(model2)):
        assert torch.equal(a.mask, b.mask)
    assert sparsifier2.step_count == sparsifier.step_count and sparsifier2.history == sparsifier.history
    assert torch.equal(sparsifier2.generator.get_state(), sparsifier.generator.get_state())
    assert sparsifier2.state_dict()["extra"].keys() == state["extra"].keys()


@pytest.mark.parametrize("name", sorted(MASKED))  # compressed ones: test_conformance.py
def test_same_seed_same_masks(name, setup, train):
    runs = []
    for _ in range(2):
        model, optimizer, sparsifier = setup(name, seed=3)
        train(model, optimizer, sparsifier, 20)
        runs.append([m.mask.clone() for m in sparsetorch.iter_masks(model)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", ["static", "set", "srigl"])
def test_other_seed_other_masks(name, setup):
    a = [m.mask.clone() for m in sparsetorch.iter_masks(setup(name, seed=1)[0])]
    b = [m.mask.clone() for m in sparsetorch.iter_masks(setup(name, seed=2)[0])]
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(MASKED))  # compressed ones: test_conformance.py
def test_history_rows_count_moves(name, setup, train):
    model, optimizer, sparsifier = setup(name)
    train(model, optimizer, sparsifier, 20)
    rows = [r for r in sparsifier.history if "dropped" in r]
    if name in ("static", "snip", "grasp", "synflow"):
        assert rows == [] and len(sparsifier.history) == 1
        return
    assert rows and all(r["dropped"] >= 0 and r["grown"] >= 0 for r in rows)
    if name in ("set", "rigl", "srigl"):
        assert all(r["dropped"] == r["grown"] for r in rows)  # fixed density: drop k, grow k
        assert sum(r["grown"] for r in rows) > 0
    else:
        assert all(r["grown"] == 0 for r in rows) and sum(r["dropped"] for r in rows) > 0


# ---- bad input: clear error, nothing changed ---------------------------------------------------
@pytest.mark.parametrize("name,kwargs,match", [
    ("gmp", dict(start=10, end=10), "ends before it starts"),
    ("gmp", dict(start=10, end=3), "ends before it starts"),
    ("gmp", dict(every=0), "positive integer"),
    ("gmp", dict(sparsity=1.0), "sparsity"),
    ("gmp", dict(initial_sparsity=0.95, sparsity=0.9), "initial_sparsity"),
    ("gmp", dict(scope="everywhere"), "scope"),
    ("set", dict(every=-1), "positive integer"),
    ("rigl", dict(drop_fraction=0.0), "drop_fraction"),
    ("rigl", dict(drop_fraction=1.0), "drop_fraction"),
    ("srigl", dict(end=0), "ends before it starts"),
    ("set", dict(distribution="pareto"), "distribution"),
    ("static", dict(sparsity=-0.1), "sparsity"),
    ("snip", dict(batch=None), "batch"),
    ("synflow", dict(example_inputs=None), "example_inputs"),
    ("lottery", dict(rounds=0), "rounds"),
    ("lottery", dict(rewind_step=-2), "rewind_step"),
])
def test_bad_hyperparameters(name, kwargs, match, build):
    with pytest.raises(SparsityError, match=match):
        build(name, **kwargs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_keyword_names_it_and_the_valid_ones(name):
    with pytest.raises(SparsityError, match=r"unknown keyword argument\(s\) 'evry' \(did you mean 'every'\?\)|"
                                            r"unknown keyword argument\(s\) 'evry'; valid keywords are \[") as info:
        METHODS[name](evry=3)
    assert "generator" in str(info.value) and "include" in str(info.value)


def test_unknown_method():
    with pytest.raises(SparsityError, match="choose one of"):
        make_sparsifier("magic")


@pytest.mark.parametrize("name", sorted(MASKED))  # compressed ones: test_conformance.py
def test_attach_twice_step_before_attach_and_missing_params(name, build):
    torch.manual_seed(0)
    model = MLP(SIZES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsifier = build(name)
    with pytest.raises(SparsityError, match="attach"):
        sparsifier.step()
    with pytest.raises(SparsityError, match="not in the optimizer"):
        sparsifier.attach(model, torch.optim.SGD(model.classifier.parameters(), lr=0.1))
    assert list(sparsetorch.iter_masks(model)) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(model, optimizer)
    masks = [m.mask.clone() for m in sparsetorch.iter_masks(model)]
    with pytest.raises(SparsityError, match="already attached"):
        sparsifier.attach(model, optimizer)
    assert all(torch.equal(a, b.mask) for a, b in zip(masks, sparsetorch.iter_masks(model)))


@pytest.mark.parametrize("how", ["deepcopy", "assign"])
def test_copies_of_a_masked_model_keep_their_zeros(how):
    """A deep copy (or a load_state_dict(assign=True)) has the mask buffers but new Parameters: before, the
    copy's pruned weights came back to life at the first Adam step, silently."""
    import copy

    from sparsetorch.core.masks import iter_masks, set_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    set_mask(model[0], torch.rand(16, 16) > 0.5)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        twin = copy.deepcopy(model)
        twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    for _ in range(3):
        twin(torch.randn(8, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    (item,) = list(iter_masks(twin))
    assert not item.module.weight[~item.mask].any()


def test_a_masked_layer_resized_by_hand_says_to_drop_its_mask():
    """Replacing a masked weight by one of another shape leaves a stale mask; the first forward says so."""
    from sparsetorch.core.masks import set_mask

    layer = nn.Linear(8, 6)
    set_mask(layer, torch.rand(6, 8) > 0.5)
    layer.weight = nn.Parameter(torch.randn(3, 8))
    with pytest.raises(SparsityError, match="remove_mask"):
        layer(torch.randn(2, 8))


def test_frozen_masked_weights_and_frozen_copies():
    """PEFT freezes the base weights before the first forward of a deep copy: masking a frozen weight (or a copy
    of one) must work, and unfreezing it later must bring back the gradient mask."""
    import copy

    from sparsetorch.core.masks import set_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    set_mask(model[0], torch.rand(16, 16) > 0.5)
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    twin(torch.randn(2, 16))                    # registers the frozen copy
    frozen = nn.Linear(8, 8).requires_grad_(False)
    set_mask(frozen, torch.rand(8, 8) > 0.5)   # masking a frozen layer
    twin.requires_grad_(True)
    opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        twin(torch.randn(8, 16)).square().sum().backward()
        assert not twin[0].weight.grad[~twin[0].weight_mask].any()
        opt.step()
        opt.zero_grad()
    assert not twin[0].weight[~twin[0].weight_mask].any()
