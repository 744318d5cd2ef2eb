"""Compressed files under attack and at random: tampered, truncated, hostile or mismatched files give one
clear SparsityError with the model untouched; random tensors and masks round-trip exactly (hypothesis)."""
import copy
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, formats
from sparsetorch.cli.main import main
from sparsetorch.formats.files import encode_smallest, read_tensors
from sparsetorch.core.masks import get_mask, set_mask
from sparsetorch.core.patterns import parse_pattern, pattern_mask


def _net(pattern="unstructured", seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 128, bias=False), nn.Linear(128, 32))
    g = torch.Generator().manual_seed(seed)
    for layer, p in ((net[0], pattern), (net[2], "unstructured"), (net[3], "2:4")):
        set_mask(layer, pattern_mask(torch.rand(layer.weight.shape, generator=g), 0.5 if p == "2:4" else 0.1,
                                     parse_pattern(p)))
    return net


def _split(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _formats_in(path):
    header, _ = _split(path.read_bytes())
    return {k: v["format"] for k, v in json.loads(header["__metadata__"]["sparsetorch"])["tensors"].items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    out = {}
    for pattern in ("unstructured", "block:8x8"):
        net = _net(pattern)
        out[pattern] = (net, sparsetorch.save(net, root / f"{pattern.replace(':', '')}.safetensors"))
    return out


def test_files_use_the_compressed_formats(files):
    assert set(_formats_in(files["unstructured"][1]).values()) >= {"gapmask", "nm", "dense"}
    assert _formats_in(files["block:8x8"][1])["0.weight"] == "bsr"


def _tamper(header, data, target, how):
    meta = json.loads(header["__metadata__"]["sparsetorch"])
    entry = meta["tensors"][target]
    data = bytearray(data)
    if how == "nnz+1":
        entry[{"bsr": "nblocks"}.get(entry["format"], "nnz")] += 1
    elif how == "huge-shape":
        entry["shape"] = [2**20, 2**19]
    elif how == "shape":
        entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1] // 2]
    elif how == "codes":
        key = {"gapmask": "codes"}.get(entry["format"])
        if key is None:
            pytest.skip("no code count in this format")
        entry[key] += 8
    elif how == "param":
        for key, bad in (("bits", 3), ("chunk", 17), ("m", 5), ("block", [3, 0]), ("masked", "yes")):
            if key in entry:
                entry[key] = bad
                break
    elif how == "codec":
        entry["values"] = "fp4"
    elif how == "flip-data":  # flip every byte of the target's parts (codes, indices, bits and values)
        for name, info in header.items():
            if name.startswith(target + "::"):
                a, b = info["data_offsets"]
                data[a:b] = bytes(x ^ 0xFF for x in data[a:b])
    elif how == "drop-part":
        name = next(n for n in header if n.startswith(target + "::") and not n.endswith("values"))
        del header[name]
    elif how == "dtype":
        name = next(n for n in header if n.startswith(target + "::") and not n.endswith("values"))
        header[name]["dtype"] = {"U8": "I8"}.get(header[name]["dtype"], "U8")
        if header[name]["dtype"] == "U8":
            pytest.skip("width change would need other offsets")
    header["__metadata__"]["sparsetorch"] = json.dumps(meta)
    return _join(header, bytes(data))


@pytest.mark.parametrize("target", ["0.weight", "2.weight", "3.weight"])
@pytest.mark.parametrize("pattern", ["unstructured", "block:8x8"])
@pytest.mark.parametrize("how", ["nnz+1", "huge-shape", "shape", "codes", "param", "codec", "flip-data",
                                 "drop-part", "dtype"])
def test_tampered_files_fail_cleanly(files, tmp_path, target, pattern, how):
    net, path = files[pattern]
    header, data = _split(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_tamper(header, data, target, how))
    fresh = _net(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    masks_before = [get_mask(fresh[i]).clone() for i in (0, 2, 3)]
    if how == "flip-data":
        # flipped values are still valid numbers, and a flipped code may decode to another valid
        # mask: either the file is rejected or it loads something, never anything out of bounds
        try:
            sparsetorch.load(fresh, bad)
        except SparsityError:
            pass
        else:
            return
    else:
        with pytest.raises(SparsityError) as info:
            sparsetorch.load(fresh, bad)
        assert "\n" not in str(info.value)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(get_mask(fresh[i]), m) for i, m in zip((0, 2, 3), masks_before))


@pytest.mark.parametrize("cut", [9, 100, 0.5, -1])
def test_truncated_files_fail_cleanly(files, tmp_path, cut):
    net, path = files["unstructured"]
    raw = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[: cut if isinstance(cut, int) else int(len(raw) * cut)])
    fresh = _net(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(SparsityError):
        sparsetorch.load(fresh, bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_huge_claim_is_refused_before_decoding(files, tmp_path):
    _, path = files["unstructured"]
    header, data = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["sparsetorch"])
    meta["tensors"]["2.weight"]["shape"] = [2**20, 2**20]  # 4 TiB from a few KiB
    header["__metadata__"]["sparsetorch"] = json.dumps(meta)
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(_join(header, data))
    with pytest.raises(SparsityError, match="claims"):
        read_tensors(bad)
    assert main(["info", str(bad)]) == 2


def test_model_mismatch_is_caught_before_decoding(files):
    _, path = files["unstructured"]
    other = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64, bias=False), nn.Linear(64, 32))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SparsityError, match="shape"):
        sparsetorch.load(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_info_cli(files, tmp_path, capsys):
    _, path = files["unstructured"]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gapmask" in out and "nm" in out and "total (5 tensors)" in out and "90.0%" in out
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    row = next(r for r in info["tensors"] if r["name"] == "2.weight")
    assert row["nnz"] == int(get_mask(files["unstructured"][0][2]).sum()) and row["masked"]
    assert info["totals"]["file_bytes"] == os.path.getsize(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sparsetorch info: error:" in err


_PATTERNS = st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "block:2x2", "block:4x8", "channel", "empty",
                             "full"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 24), cols=st.sampled_from([1, 3, 8, 16, 24, 40, 300]), extra=st.sampled_from([(), (3,)]),
       density=st.floats(0.0, 1.0), pattern=_PATTERNS, seed=st.integers(0, 2**16), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_random_tensors_round_trip_in_every_format(rows, cols, extra, density, pattern, seed, masked, dtype):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols, *extra)
    scores = torch.rand(shape, generator=g)
    if pattern == "empty" or pattern == "full":
        mask = torch.full(shape, pattern == "full")
    elif pattern == "unstructured":
        mask = scores < density
    else:
        try:
            mask = pattern_mask(scores, min(max(density, 0.05), 0.95), parse_pattern(pattern))
        except SparsityError:
            mask = scores < density  # the pattern does not fit this shape
    w = (torch.randn(shape, generator=g) * mask).to(dtype)
    m = mask if masked else None
    expect_mask = mask if masked else w != 0
    for name in formats.FORMATS:
        try:
            parts, meta = formats.encode(name, w, m)
        except SparsityError:
            continue  # N:M or BSR not applicable
        dense, got = formats.decode(parts, meta)
        assert torch.equal(dense, w) and dense.dtype == dtype, name
        if name != "dense" or masked:
            assert (got is None) == (not masked) and (got is None or torch.equal(got, expect_mask)), name
    name, parts, meta = encode_smallest(w, m)
    assert torch.equal(formats.decode(parts, meta)[0], w)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=64), name=st.sampled_from(["csr", "gapmask", "nm", "bsr", "bitmask"]),
       nnz=st.integers(0, 40), extra=st.integers(0, 64))
def test_random_bytes_never_decode_out_of_bounds(data, name, nnz, extra):
    # hostile parts with plausible metadata: decode either works and stays in the shape, or says corrupted
    shape = [8, 16]
    meta = {"format": name, "shape": shape, "dtype": "float32", "nnz": nnz, "codes": extra, "bits": 4,
            "chunk": 256, "n": 2, "m": 4, "exact": False, "block": [2, 2], "nblocks": nnz}
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    parts = {"values": torch.randn(nnz if name != "bsr" else nnz * 4), "gaps": buf, "codes": buf, "indices": buf,
             "counts": buf[: 8], "blocks": buf[:4], "bitmask": buf[:16]}
    try:
        dense, mask = formats.decode(parts, meta)
    except SparsityError:
        return
    assert dense.shape == (8, 16) and mask.shape == (8, 16) and int(mask.sum()) == int((dense != 0).sum()) + \
        int(((dense == 0) & mask).sum())


def test_squeezed_parts_round_trip_and_shrink():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = (torch.randn(256, 64, generator=g) * 0.02).to(dtype)
        parts, meta = formats.encode("dense", w, None)
        small, zmeta = formats.squeeze(parts, meta)
        assert "values" in zmeta["z"] and formats.stored_bytes(small) < 0.9 * formats.stored_bytes(parts)
        assert torch.equal(formats.decode(small, zmeta)[0], w)
    noise = torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)
    parts, meta = formats.encode("dense", noise, None)
    assert formats.squeeze(parts, meta)[1] is meta  # incompressible: kept as it is


@pytest.mark.parametrize("how", ["bomb", "short", "lengths", "numel", "garbage", "table"])
def test_tampered_compressed_parts_fail_cleanly(how):
    import zlib

    w = torch.randn(64, 64) * 0.02
    parts, meta = formats.squeeze(*formats.encode("dense", w, None))
    z = meta["z"]["values"]
    if how == "bomb":  # a plane that inflates far beyond what the table says
        blob = zlib.compress(bytes(10**7))
        z["planes"] = [len(blob), 0, 0, 0]
        parts = {"values": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    elif how == "short":
        z["numel"] += 1
    elif how == "lengths":
        z["planes"][0] += 1
    elif how == "numel":
        z["numel"] = 2**40
    elif how == "garbage":
        parts = {"values": torch.full_like(parts["values"], 7)}
    elif how == "table":
        meta["z"] = ["values"]
    with pytest.raises(SparsityError):
        formats.decode(parts, meta)
