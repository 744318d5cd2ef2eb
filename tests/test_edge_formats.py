"""The edge runtime's weights in memory: bitmask + fp32 / bf16 / fp16 / int8 values exactly as stored (the decode
kernels' layout), the same numbers from the compiled kernels, numpy and torch's BitmaskWeight, older files still
read, and corrupted bitmask weights refused with SparsityError before any kernel reads them."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load, load_file, save, save_file
from torch import nn

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.edge.linear import Linear, bitmask_kernels
from sparsetorch.edge.weights import bf16_to_float, decode_matrix, encode_matrix, pack_mask, to_bf16
from sparsetorch.errors import SparsityError
from sparsetorch.kernels.bitmask_weight import BitmaskWeight
from sparsetorch.kernels.bitmask_weight import pack_mask as torch_pack_mask

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["numpy", "dense"] + (["compiled"] if bitmask_kernels() is not None else [])
STORED = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.float16, "int8": np.int8}
TORCH_VALUES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def sparse(shape, density, seed=0):
    g = np.random.default_rng(seed)
    w = (g.standard_normal(shape) * (g.random(shape) < density)).astype(np.float32)
    w[min(3, shape[0] - 1)] = 0  # an empty row
    return w


def torch_twin(parts, meta) -> BitmaskWeight:
    """torch's BitmaskWeight over the very arrays the edge file stores (same layout, no conversion)."""
    out, inp = meta["shape"]
    values = torch.from_numpy(parts["values"].reshape(-1).copy())
    if meta["values"] == "bf16":
        values = values.view(torch.int16).view(torch.bfloat16)
    if meta["layout"] == "dense":
        mask, row_start = None, torch.arange(out + 1, dtype=torch.int64) * inp
    else:
        mask, row_start = torch.from_numpy(parts["mask"].copy()), torch.from_numpy(parts["row_start"].copy())
    scales = torch.from_numpy(parts["scale"].copy()).view(out, 1) if "scale" in parts else None
    group = (inp + 15) // 16 * 16 if scales is not None else 0
    return BitmaskWeight(mask, row_start, values, out, inp, scales, group)


@pytest.mark.parametrize("values", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("shape, density", [((37, 70), 0.5), ((64, 129), 0.1), ((5, 16), 0.3), ((24, 33), 1.0)])
def test_kernels_numpy_and_torch_agree_on_the_stored_weight(values, shape, density):
    w = sparse(shape, density)
    parts, meta = encode_matrix(w, values)
    parts = load(save(parts))  # what a file holds after the safetensors round trip
    assert parts["values"].dtype == STORED[values]
    assert meta["layout"] == ("dense" if density == 1.0 else "bitmask")
    bias = np.linspace(-1, 1, shape[0], dtype=np.float32)
    twin = torch_twin(parts, meta)
    for rows in (1, 3, 40, 130):  # 40: the sparse x dense panel kernel (at most half kept); 130: past BITMASK_PREFILL_ROWS
        x = np.random.default_rng(rows).standard_normal((rows, shape[1])).astype(np.float32)
        with torch.no_grad():
            want = twin.linear(torch.from_numpy(x), torch.from_numpy(bias), backend="torch").numpy()
        for backend in BACKENDS:
            lin = Linear(decode_matrix("w", parts, meta), bias, backend)
            if backend != "dense" and (values != "fp32" or density < 1):
                # in memory as stored: the mask words and the 16-bit / int8 values, no CSR, no float32 copy
                assert lin.weight.kind == "bitmask" and lin.weight.values.dtype == STORED[values]
                assert lin.weight.values is not None and not hasattr(lin, "dense")
            # a dense int8 layer at decode batch sizes runs on 16-bit activation codes on AVX2 (a scale per 256
            # inputs): its error is bounded by the output's scale, ~2^-16 of it per input, not by each output's size
            atol = 1e-4 * float(np.abs(want).max()) if values == "int8" and density == 1.0 else 1e-5
            np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=atol, err_msg=f"{backend} rows={rows}")
        if bitmask_kernels() is not None:
            with torch.no_grad():
                ext = twin.linear(torch.from_numpy(x), torch.from_numpy(bias), backend="ext").numpy()
            # each runtime may pick its own kernel (for many rows the panel kernel, or unpack + BLAS, or the torch
            # runtime's faster-on-first-call choice; on AVX2 a dense row's dot product): the same products summed
            # in another order, outputs up to ~20 here
            tol = 1e-5
            np.testing.assert_allclose(Linear(decode_matrix("w", parts, meta), bias, "compiled")(x), ext,
                                       rtol=tol, atol=tol)


def test_value_roundings_match_torch():
    w = np.random.default_rng(0).standard_normal((7, 300)).astype(np.float32) * 10.0 ** np.arange(-3, 4)[:, None]
    np.testing.assert_array_equal(bf16_to_float(to_bf16(w)), torch.from_numpy(w).bfloat16().float().numpy())
    keep = np.random.default_rng(1).random((5, 37)) < 0.5
    np.testing.assert_array_equal(pack_mask(keep), torch_pack_mask(torch.from_numpy(keep)).numpy())
    with pytest.raises(SparsityError, match="fp16 tops out"):
        encode_matrix(np.full((2, 2), 1e5, np.float32), "fp16")
    with pytest.raises(SparsityError, match="NaN"):
        encode_matrix(np.full((2, 2), np.nan, np.float32))


def _mlp(seed=0, sparsity=0.7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(70, 48), nn.GELU(), nn.Linear(48, 33), nn.ReLU(), nn.Linear(33, 10)).eval()
    sparsetorch.prune(model, sparsity)
    return model


@pytest.mark.parametrize("values", ["bf16", "fp16", "int8"])
def test_compact_exports_are_smaller_and_match_their_rounded_weights(values, tmp_path):
    model = _mlp()
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(0))
    sparsetorch.export_edge(model, x[:1], tmp_path / "fp32.spt")
    desc = sparsetorch.export_edge(model, x[:1], tmp_path / "small.spt", values=values)
    assert desc["version"] == 3 and desc["values"] == values
    assert (tmp_path / "small.spt").stat().st_size < 0.75 * (tmp_path / "fp32.spt").stat().st_size
    loaded = {b: edge.load(tmp_path / "small.spt", backend=b)(x.numpy()) for b in BACKENDS}
    for got in loaded.values():
        np.testing.assert_allclose(got, loaded["numpy"], rtol=1e-5, atol=1e-5)
    if values in ("bf16", "fp16"):  # exactly torch with the weights rounded to that type
        rounded = _mlp()
        with torch.no_grad():
            for lin in rounded[::2]:
                lin.weight.copy_(lin.weight.to(TORCH_VALUES[values]).float())
            np.testing.assert_allclose(loaded["numpy"], rounded(x).numpy(), rtol=1e-5, atol=1e-5)


# -- older files -------------------------------------------------------------------------------------------------
def _as_version_1(path, out):
    """Rewrite an exported file the way format version 1 stored bitmasks: np.packbits over the whole matrix."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        desc = json.loads(fh.metadata()["sparsetorch.edge"])
    arrays = load_file(str(path))
    for name, meta in desc["tensors"].items():
        if meta["layout"] == "bitmask":
            keep = decode_matrix(name, {k.split("/")[1]: v for k, v in arrays.items() if k.startswith(name + "/")},
                                 meta).to_dense() != 0
            del arrays[f"{name}/mask"], arrays[f"{name}/row_start"]
            arrays[f"{name}/bits"] = np.packbits(keep.reshape(-1))
    desc["version"] = 1
    save_file(arrays, str(out), metadata={"sparsetorch.edge": json.dumps(desc)})
    return out


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_version_1_bitmask_files_still_load_into_the_kernel_layout(values, tmp_path):
    model = _mlp(1)
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(2))
    desc = sparsetorch.export_edge(model, x[:1], tmp_path / "new.spt", values=values)
    assert "bitmask" in {m["layout"] for m in desc["tensors"].values()}
    old = _as_version_1(tmp_path / "new.spt", tmp_path / "old.spt")
    for backend in BACKENDS:
        want = edge.load(tmp_path / "new.spt", backend=backend)(x.numpy())
        np.testing.assert_array_equal(edge.load(old, backend=backend)(x.numpy()), want)


# -- corrupted or hostile bitmask weights ----------------------------------------------------------------------------
def _shift_row_start(a):  # row starts that go down and up again: not monotonic, same total
    rs = a["row_start"].copy()
    rs[1], rs[2] = rs[2], rs[1]
    a["row_start"] = rs


def _bit_past_the_inputs(a):  # 70 inputs: word 4 holds columns 64..79, bits 6.. are past the row
    m = a["mask"].copy()
    m[0, -1] |= np.int16(1 << 10)
    a["mask"] = m


HOSTILE = {
    "mask_words_short": (lambda a: a.update(mask=a["mask"][:, :-1].copy()), "bytes for"),
    "mask_dtype": (lambda a: a.update(mask=a["mask"].view(np.uint16)), "dtype"),
    "row_start_short": (lambda a: a.update(row_start=a["row_start"][:-1].copy()), "row starts for"),
    "row_start_int32": (lambda a: a.update(row_start=a["row_start"].astype(np.int32)), "dtype"),
    "row_start_not_monotonic": (_shift_row_start, "row 0 keeps"),
    "row_start_offset": (lambda a: a.update(row_start=a["row_start"] + 5), "begin at 5"),
    "values_fewer_than_popcount": (lambda a: a.update(values=a["values"][:-1].copy()), "elements, expected"),
    "values_more_than_popcount": (lambda a: a.update(values=np.concatenate([a["values"], a["values"][:1]])),
                                  "elements, expected"),
    "mask_bit_past_inputs": (_bit_past_the_inputs, "past its 70 inputs"),
    "int8_scale_short": (lambda a: a.update(scale=a["scale"][:-1].copy()), "scale holds"),
    "int8_values_as_fp32": (lambda a: a.update(values=a["values"].astype(np.float32)), "dtype"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_corrupted_bitmask_weights_are_refused_before_any_kernel(case, tmp_path, monkeypatch):
    path = tmp_path / "ok.spt"
    desc = sparsetorch.export_edge(_mlp(2), torch.zeros(1, 70), path, values="int8")
    name = "0.weight"
    assert desc["tensors"][name]["layout"] == "bitmask" and desc["tensors"][name]["shape"] == [48, 70]
    arrays = load_file(str(path))
    parts = {k.split("/")[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
    edit, needle = HOSTILE[case]
    edit(parts)
    arrays.update({f"{name}/{k}": v for k, v in parts.items()})
    save_file(arrays, str(tmp_path / "bad.spt"), metadata={"sparsetorch.edge": json.dumps(desc)})

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was reached with an unchecked weight")
    import sparsetorch.edge.linear as edge_linear
    monkeypatch.setattr(edge_linear, "bitmask_kernels", lambda: type("K", (), {"bitmask_linear": no_kernel,
                                                                              "bitmask_to_dense": no_kernel}))
    for backend in ("auto", "numpy"):
        with pytest.raises(SparsityError, match=needle):
            edge.load(tmp_path / "bad.spt", backend=backend)
