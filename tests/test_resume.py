"""Stopping a sparse run, saving it and resuming it gives bitwise the run that never stopped."""
import json

import pytest
import torch
from torch import nn
from safetensors import safe_open

import sparsetorch
from sparsetorch.errors import SparsityError
from sparsetorch.integrations import load_training_state, save_training_state
from sparsetorch.models import MLP

import ddp_worker

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def sparsifiers():
    """Every method that has landed, plus the random-swap machinery check."""
    return ddp_worker.methods()


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)


def setup(opt_name, make_sparsifier, seed=0):
    torch.manual_seed(seed)
    model = MLP((12, 24, 16, 3))
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    sparsifier = make_sparsifier(torch.Generator().manual_seed(7))
    return model, optimizer, sparsifier


def train(model, optimizer, sparsifier, steps):
    for step in steps:
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()


def assert_same_run(a, b):
    (model_a, opt_a, sp_a), (model_b, opt_b, sp_b) = a, b
    for (name, ta), tb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(ta, tb), name
    for item_a, item_b in zip(sparsetorch.iter_masks(model_a), sparsetorch.iter_masks(model_b)):
        assert torch.equal(item_a.mask, item_b.mask), item_a.qualified_name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key in state_a:
        for name, value in state_a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key][name])), (key, name)
    assert sp_a.step_count == sp_b.step_count and sp_a.history == sp_b.history
    assert torch.equal(sp_a.generator.get_state(), sp_b.generator.get_state())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(sparsifiers()))
def test_resume_is_bitwise_the_uninterrupted_run(tmp_path, opt_name, method):
    make = sparsifiers()[method]
    model, optimizer, sparsifier = setup(opt_name, make)
    sparsifier.attach(model, optimizer)
    train(model, optimizer, sparsifier, range(0, 10))
    reference = (model, optimizer, sparsifier)

    model, optimizer, sparsifier = setup(opt_name, make)
    sparsifier.attach(model, optimizer)
    train(model, optimizer, sparsifier, range(0, 5))
    save_training_state(model, tmp_path / "ckpt", optimizer, sparsifier, extra={"next_step": 5})
    del model, optimizer, sparsifier

    # a fresh process would rebuild everything, here even from a different seed
    model, optimizer, sparsifier = setup(opt_name, make, seed=123)
    extra = load_training_state(model, tmp_path / "ckpt", optimizer, sparsifier)
    assert extra == {"next_step": 5}
    train(model, optimizer, sparsifier, range(extra["next_step"], 10))
    assert_same_run(reference, (model, optimizer, sparsifier))
    if method != "Static":  # the masks of every other method change during these 10 steps
        first = sparsifier.history[0]["density"]
        assert any(row["moved"] > 0 or row["density"] != first for row in sparsifier.history[1:]), "masks never changed"
    for item in sparsetorch.iter_masks(model):
        assert (item.param[~item.mask] == 0).all()


def test_state_folder_is_safetensors_and_json_only(tmp_path):
    model, optimizer, sparsifier = setup("adam", sparsifiers()["swap"])
    sparsifier.attach(model, optimizer)
    train(model, optimizer, sparsifier, range(3))
    folder = save_training_state(model, tmp_path / "ckpt", optimizer, sparsifier)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.safetensors"]
    with safe_open(str(folder / "state.safetensors"), framework="pt") as fh:
        header = json.loads(fh.metadata()["sparsetorch.training_state"])
        keys = set(fh.keys())
    assert header["sections"]["sparsifier"]["t"] == "dict" and any(k.startswith("sparsifier/masks/") for k in keys)
    # the model file alone is an ordinary sparsetorch checkpoint
    fresh = MLP((12, 24, 16, 3))
    sparsetorch.load(fresh, folder / "model.safetensors")
    assert torch.equal(fresh.fc1.weight, model.fc1.weight) and torch.equal(fresh.fc1.weight_mask, model.fc1.weight_mask)


def test_interrupted_save_is_detected(tmp_path):
    model, optimizer, sparsifier = setup("sgd", sparsifiers()["swap"])
    sparsifier.attach(model, optimizer)
    save_training_state(model, tmp_path / "ckpt", optimizer, sparsifier)
    train(model, optimizer, sparsifier, range(2))
    sparsetorch.save(model, tmp_path / "ckpt" / "model.safetensors")  # a newer model next to the old state
    fresh, opt2, sp2 = setup("sgd", sparsifiers()["swap"])
    with pytest.raises(SparsityError, match="interrupted"):
        load_training_state(fresh, tmp_path / "ckpt", opt2, sp2)


def test_unsavable_state_raises_before_writing(tmp_path):
    model, optimizer, sparsifier = setup("sgd", sparsifiers()["swap"])
    sparsifier.attach(model, optimizer)
    with pytest.raises(SparsityError, match="plain data"):
        save_training_state(model, tmp_path / "ckpt", optimizer, sparsifier, extra={"bad": object()})
    assert not (tmp_path / "ckpt").exists()


def test_missing_state_is_a_clear_error(tmp_path):
    model, optimizer, sparsifier = setup("sgd", sparsifiers()["swap"])
    with pytest.raises(SparsityError, match="no training state"):
        load_training_state(model, tmp_path / "nowhere", optimizer, sparsifier)
    save_training_state(model, tmp_path / "ckpt")
    with pytest.raises(SparsityError, match="no sparsifier state"):
        load_training_state(model, tmp_path / "ckpt", None, sparsifier)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda(tmp_path):
    # state_dict() keeps masks on the CPU; loading them into a CUDA model must work
    def cuda_setup(seed=0):
        model, _, sparsifier = setup("adam", sparsifiers()["swap"], seed)
        model = model.cuda()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), sparsifier

    def cuda_train(model, optimizer, sparsifier, steps):
        for step in steps:
            x, y = batch(step)
            torch.nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
            optimizer.step()
            optimizer.zero_grad()
            sparsifier.step()

    ref = cuda_setup()
    ref[2].attach(ref[0], ref[1])
    cuda_train(*ref, range(6))
    model, optimizer, sparsifier = cuda_setup()
    sparsifier.attach(model, optimizer)
    cuda_train(model, optimizer, sparsifier, range(3))
    save_training_state(model, tmp_path / "ckpt", optimizer, sparsifier)
    model, optimizer, sparsifier = cuda_setup(seed=5)
    load_training_state(model, tmp_path / "ckpt", optimizer, sparsifier)
    cuda_train(model, optimizer, sparsifier, range(3, 6))
    for item, other in zip(sparsetorch.iter_masks(model), sparsetorch.iter_masks(ref[0])):
        assert item.mask.is_cuda and torch.equal(item.mask, other.mask)
        assert (item.param[~item.mask] == 0).all()
        torch.testing.assert_close(item.param, other.param, rtol=1e-5, atol=1e-6)


def test_pruned_finetuning_resumes_without_a_sparsifier(tmp_path):
    # one-shot pruning then fine-tuning: the masks travel in model.safetensors
    def run(model, optimizer, steps):
        for step in steps:
            x, y = batch(step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    def fresh(seed=0):
        torch.manual_seed(seed)
        model = sparsetorch.prune(MLP((12, 24, 16, 3)), 0.8)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    ref = fresh()
    run(*ref, range(6))
    model, optimizer = fresh()
    run(model, optimizer, range(3))
    save_training_state(model, tmp_path / "ckpt", optimizer)
    model = MLP((12, 24, 16, 3))  # dense: the masks come from the file
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    load_training_state(model, tmp_path / "ckpt", optimizer)
    run(model, optimizer, range(3, 6))
    assert [m.qualified_name for m in sparsetorch.iter_masks(model)] == ["fc1.weight", "fc2.weight"]
    for (name, value), other in zip(model.state_dict().items(), ref[0].state_dict().values()):
        assert torch.equal(value, other), name


def test_path_first_order_is_deprecated_but_still_works(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(DeprecationWarning, match=r"save_training_state\(model, path"):
        save_training_state(tmp_path / "old", model, extra={"step": 3})
    save_training_state(model, tmp_path / "new", extra={"step": 3})
    with pytest.warns(DeprecationWarning, match=r"load_training_state\(model, path"):
        assert load_training_state(tmp_path / "new", model) == {"step": 3}
    assert load_training_state(model, tmp_path / "old") == {"step": 3}
