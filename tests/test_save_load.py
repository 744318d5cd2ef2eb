"""save/load: atomic writes, no pickle, hostile or mismatched files rejected with the model untouched."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.core.masks import iter_masks


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.fixture
def saved(tiny_net, tmp_path):
    sparsetorch.prune(tiny_net, 0.8)
    return tiny_net, sparsetorch.save(tiny_net, tmp_path / "net.safetensors")


def test_sparse_file_is_smaller(tiny_net, tmp_path):
    dense = os.path.getsize(sparsetorch.save(tiny_net, tmp_path / "dense.safetensors"))
    sparsetorch.prune(tiny_net, 0.9)
    sparse = os.path.getsize(sparsetorch.save(tiny_net, tmp_path / "sparse.safetensors"))
    assert sparse < 0.45 * dense


def test_file_is_plain_safetensors_without_pickle(saved):
    _, path = saved
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "sparsetorch" in header["__metadata__"]
    assert b"\x80\x04" not in raw[:8 + header_len]  # no pickle protocol marker in the header


def test_crash_mid_write_keeps_old_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    with torch.no_grad():
        model.fc1.weight.mul_(2)

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        sparsetorch.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "huge-header", "not-ours", "newer", "bad-json",
                                    "flip-mask", "drop-tensor", "bad-format"])
def test_damaged_files_are_rejected(saved, tmp_path, damage):
    model, path = saved
    raw = bytearray(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["sparsetorch"])

    def rewrite(header_obj):
        text = json.dumps(header_obj).encode()
        text += b" " * (-len(text) % 8)  # data offsets are relative to the header's end
        return len(text).to_bytes(8, "little") + text + bytes(raw[8 + header_len :])

    if damage == "garbage":
        bad.write_bytes(os.urandom(500))
    elif damage == "truncate":
        bad.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "huge-header":
        bad.write_bytes((2**62).to_bytes(8, "little") + bytes(raw[8:]))
    elif damage == "not-ours":
        save_file({"w": torch.zeros(3)}, str(bad))
    elif damage in ("newer", "bad-json", "bad-format", "flip-mask", "drop-tensor"):
        if damage == "newer":
            meta["version"] = 99
        elif damage == "bad-format":
            meta["tensors"]["fc1.weight"]["format"] = "quantum"
        elif damage == "flip-mask":
            meta["tensors"]["fc1.weight"]["nnz"] += 1
        elif damage == "drop-tensor":
            del meta["tensors"]["fc2.weight"]
        header["__metadata__"]["sparsetorch"] = json.dumps(meta) if damage != "bad-json" else "{not json"
        bad.write_bytes(rewrite(header))
    fresh = copy.deepcopy(model)
    state = _state(fresh)
    with pytest.raises(SparsityError) as info:
        sparsetorch.load(fresh, bad)
    assert str(info.value)
    assert _unchanged(fresh, state)


def test_mismatched_model_is_rejected_untouched(saved):
    _, path = saved
    other = nn.Sequential(nn.Linear(3, 3))
    state = _state(other)
    with pytest.raises(SparsityError, match="does not match the model"):
        sparsetorch.load(other, path)
    assert _unchanged(other, state)


def test_shape_mismatch_is_rejected(saved, tmp_path):
    model, path = saved
    other = copy.deepcopy(model)
    other.fc2 = nn.Linear(48, 33, bias=False)
    other.classifier = nn.Linear(33, 5)
    with pytest.raises(SparsityError, match="shape"):
        sparsetorch.load(other, path)


def test_loading_dense_file_clears_stale_masks(tiny_net, tmp_path):
    dense_path = sparsetorch.save(tiny_net, tmp_path / "dense.safetensors")
    pruned = copy.deepcopy(tiny_net)
    sparsetorch.prune(pruned, 0.9)
    sparsetorch.load(pruned, dense_path)
    assert not list(iter_masks(pruned))
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), tiny_net.state_dict().values()))


def test_missing_file():
    with pytest.raises(SparsityError, match="no such file"):
        sparsetorch.load(nn.Linear(2, 2), "/nonexistent/model.safetensors")


def test_load_takes_the_model_first_and_the_old_order_warns(tmp_path):
    model = nn.Linear(4, 3)
    path = sparsetorch.save(model, tmp_path / "m.safetensors")
    fresh = nn.Linear(4, 3)
    assert sparsetorch.load(fresh, path) is fresh and torch.equal(fresh.weight, model.weight)
    with pytest.warns(DeprecationWarning, match="load\\(model, path\\)"):
        sparsetorch.load(path, nn.Linear(4, 3))
    with pytest.raises(sparsetorch.SparsityError, match="nn.Module first"):
        sparsetorch.load(path, "other.safetensors")
