"""Storage formats: exact round trips, the smallest lossless choice, size bounds, lossy value codecs."""
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, formats
from sparsetorch.formats.files import choose_format, encode_smallest
from sparsetorch.core.masks import get_mask, set_mask
from sparsetorch.models import MLP
from sparsetorch.core.patterns import parse_pattern, pattern_mask

SPARSE = ["bitmask", "gapmask", "csr", "nm", "bsr"]


def _masked(shape, density, seed=0, pattern="unstructured"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if pattern == "unstructured":
        mask = torch.rand(shape, generator=g) < density
    else:
        mask = pattern_mask(torch.rand(shape, generator=g), density, parse_pattern(pattern))
    return w * mask, mask


def _roundtrip(name, w, mask, values="fp32"):
    parts, meta = formats.encode(name, w, mask, values)
    return formats.decode(parts, meta), parts, meta


@pytest.mark.parametrize("name", ["dense", *SPARSE])
@pytest.mark.parametrize("shape", [(64, 48), (8, 4, 3, 3), (96,), (300, 520)])
def test_every_format_round_trips_exactly(name, shape):
    pattern = "block:4x4" if name == "bsr" and len(shape) == 2 else "unstructured"
    if name == "bsr" and pattern == "unstructured":
        pytest.skip("BSR needs a block mask")
    w, mask = _masked(shape, 0.3, pattern=pattern)
    (dense, got), _, meta = _roundtrip(name, w, mask)
    assert meta["format"] == name
    assert torch.equal(dense, w) and dense.dtype == w.dtype
    assert torch.equal(got, mask)


def test_unmasked_sparse_tensor_round_trips_without_a_mask():
    w, _ = _masked((32, 64), 0.1)
    for name in SPARSE[:4]:
        (dense, got), _, meta = _roundtrip(name, w, None)
        assert torch.equal(dense, w) and got is None and meta["masked"] is False


def test_kept_zero_weights_keep_their_mask_bit():
    w, mask = _masked((16, 32), 0.5)
    w[mask] = 0.0  # kept but exactly zero (e.g. just regrown): only the mask says they are kept
    for name in SPARSE[:4]:
        (dense, got), _, _ = _roundtrip(name, w, mask)
        assert torch.equal(got, mask) and torch.equal(dense, w)


def test_csr_uses_narrow_indices():
    w, mask = _masked((64, 1000), 0.1)
    _, parts, meta = _roundtrip("csr", w, mask)
    assert parts["indices"].dtype == torch.uint8 and meta["chunk"] == 256
    assert parts["counts"].dtype == torch.uint8  # per (row, 256-column chunk) counts, not int32 row pointers
    w, mask = _masked((4, 70000), 0.001)  # few weights per row: 16-bit local columns beat 256-wide chunks
    (dense, got), parts, meta = _roundtrip("csr", w, mask)
    assert meta["chunk"] == 65536 and parts["indices"].dtype == torch.int16
    assert torch.equal(dense, w) and torch.equal(got, mask)


def test_nm_two_four_packs_three_bits_per_group():
    w, mask = _masked((64, 128), 0.5, pattern="2:4")
    (dense, got), parts, meta = _roundtrip("nm", w, mask)
    assert (meta["n"], meta["m"], meta["exact"]) == (2, 4, True)
    assert parts["codes"].numel() == 64 * 128 // 4 * 3 // 8  # C(4,2)=6 masks -> 3 bits per group
    assert torch.equal(dense, w) and torch.equal(got, mask)


def test_bsr_finds_the_block_shape():
    w, mask = _masked((64, 128), 0.25, pattern="block:16x16")
    (dense, got), parts, meta = _roundtrip("bsr", w, mask)
    assert meta["block"][0] % 16 == 0 and meta["block"][1] % 16 == 0
    assert torch.equal(dense, w) and torch.equal(got, mask)
    rows = torch.zeros(32, 64, dtype=torch.bool)
    rows[::3] = True  # channel pruning: whole output rows
    (_, got), _, meta = _roundtrip("bsr", torch.randn(32, 64) * rows, rows)
    assert meta["block"] == [1, 64] and torch.equal(got, rows)
    with pytest.raises(SparsityError, match="not constant on blocks"):
        formats.encode("bsr", *_masked((32, 32), 0.3))


@pytest.mark.parametrize("pattern, expected", [("unstructured", "gapmask"), ("2:4", "nm"), ("block:8x8", "bsr")])
def test_choice_is_the_smallest_and_fits_the_pattern(pattern, expected):
    density = 0.5 if pattern == "2:4" else 0.1
    w, mask = _masked((128, 256), density, pattern=pattern)
    name, parts, _ = encode_smallest(w, mask)
    assert name == expected
    for other in ["dense", *SPARSE]:
        try:
            assert formats.stored_bytes(parts) <= formats.stored_bytes(formats.encode(other, w, mask)[0])
        except SparsityError:
            pass  # the format does not apply to this mask


def test_dense_tensor_and_nonzeros_outside_the_mask_stay_dense():
    w = torch.randn(32, 32)
    assert choose_format(w, None) == "dense"
    mask = torch.rand(32, 32) < 0.1
    assert choose_format(w, mask) == "dense"  # the pruned weights are not zero: only dense is exact


def _layer(n, density, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n, n, bias=False)
    set_mask(layer, torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < density)
    return layer


@pytest.mark.parametrize("values, bound", [("fp32", 0.12), ("fp16", 0.07), ("bf16", 0.07), ("int8", 0.05)])
def test_90_percent_layer_file_size(tmp_path, values, bound):
    layer = _layer(1024, 0.1)
    path = sparsetorch.save(layer, tmp_path / "l.safetensors", values=values)
    ratio = os.path.getsize(path) / (1024 * 1024 * 4)
    assert ratio <= bound, ratio
    assert ratio >= 0.1 * (2 if values == "fp32" else 1) / 4  # sanity: the values alone take that much


def test_90_percent_model_file_size(tmp_path):
    model = MLP([64, 512, 512, 10])
    save_file(model.state_dict(), str(tmp_path / "dense.safetensors"))  # the plain dense fp32 file
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    sparsetorch.prune(model, 0.9, include=[nn.Linear])  # 90% of all weights (classifier too), biases dense
    for values, bound in [("fp32", 0.12), ("fp16", 0.07)]:
        path = sparsetorch.save(model, tmp_path / f"{values}.safetensors", values=values)
        assert os.path.getsize(path) / dense <= bound


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "int8"])
def test_save_load_values_within_documented_bound(tmp_path, values):
    layer = nn.Sequential(_layer(64, 0.2), nn.Linear(64, 8))
    path = sparsetorch.save(layer, tmp_path / "m.safetensors", values=values)
    fresh = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 8))
    sparsetorch.load(fresh, path)
    w, got = layer[0].weight, fresh[0].weight
    assert torch.equal(get_mask(fresh[0]), get_mask(layer[0]))
    assert torch.equal(got[~get_mask(layer[0])], torch.zeros_like(got[~get_mask(layer[0])]))
    err = (got - w).abs()
    if values == "fp32":
        assert torch.equal(got, w) and torch.equal(fresh[1].weight, layer[1].weight)
    elif values == "int8":
        assert (err <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
        assert torch.equal(fresh[1].bias, layer[1].bias)  # vectors stay exact under int8
    else:
        rel = 2.0 ** (-11 if values == "fp16" else -8)
        assert (err <= w.abs() * rel).all()


def test_lossy_rejects_what_it_cannot_store(tmp_path):
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = 1e6
    with pytest.raises(SparsityError, match="fp16 range"):
        sparsetorch.save(layer, tmp_path / "x.safetensors", values="fp16")
    with pytest.raises(SparsityError, match="values must be one of"):
        sparsetorch.save(layer, tmp_path / "x.safetensors", values="fp8")
    assert not (tmp_path / "x.safetensors").exists()


def test_forced_format(tmp_path):
    layer = _layer(64, 0.1)
    for name in ["dense", "bitmask", "csr", "gapmask", "nm"]:
        path = sparsetorch.save(layer, tmp_path / f"{name}.safetensors", format=name)
        fresh = nn.Linear(64, 64, bias=False)
        sparsetorch.load(fresh, path)
        assert torch.equal(fresh.weight, layer.weight) and torch.equal(get_mask(fresh), get_mask(layer))
    with pytest.raises(SparsityError, match="cannot be stored as 'bsr'"):
        sparsetorch.save(layer, tmp_path / "b.safetensors", format="bsr")
    with torch.no_grad():
        layer.weight[~get_mask(layer)] = 1.0  # bypass the mask
    with pytest.raises(SparsityError, match="outside its mask"):
        sparsetorch.save(layer, tmp_path / "c.safetensors", format="csr")


def test_int8_keeps_the_mask_of_weights_that_round_to_zero(tmp_path):
    layer = _layer(32, 0.5)
    with torch.no_grad():
        kept = get_mask(layer).nonzero()[0]
        layer.weight[kept[0], kept[1]] = 1e-9  # far below the row's int8 step
    fresh = nn.Linear(32, 32, bias=False)
    sparsetorch.load(fresh, sparsetorch.save(layer, tmp_path / "q.safetensors", values="int8"))
    assert torch.equal(get_mask(fresh), get_mask(layer)) and fresh.weight[kept[0], kept[1]] == 0
