"""Dense weights by whole columns (kernels/dense_columns.py, csrc/decode_columns.inc coldense_*) against torch,
on every ISA this CPU has, and their state_dict checks."""
import pytest
import torch
from safetensors.torch import load, save

from sparsetorch.errors import SparsityError
from sparsetorch.inference.packed_modules import PackedLinear
from sparsetorch.kernels import has_extension, inference_ops
from sparsetorch.kernels.dense_columns import DenseColumnWeight
from sparsetorch.kernels.inference_ops import sparsify_input


def _weight(out, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    w[torch.rand(out, n, generator=g) < 0.6] = 0  # pruned weights are stored as zeros in this layout
    return w


def _isas():
    return ["generic", "avx2", "avx512"][:inference_ops.isa_level() + 1] if has_extension() else []


@pytest.mark.parametrize("shape", [(37, 100), (300, 129), (16, 5)])
@pytest.mark.parametrize("values", ["fp32", "bf16", "fp16", "int8"])
def test_dense_columns_match_torch(shape, values):
    out, n = shape
    w = _weight(out, n)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2))
    x = torch.randn(140, n, generator=torch.Generator().manual_seed(3))
    for act in (0.0, 0.5, 1.0):  # none, half and every input zeroed
        p = DenseColumnWeight.from_dense(w, float(x.abs().quantile(act)) if act else 0.0, values)
        if values == "fp32":
            assert torch.equal(p.to_dense(), w)
        for batch in (1, 2, 3, 11, 140):  # 140: the prefill GEMM over W^T
            ref = torch.nn.functional.linear(sparsify_input(x[:batch], float(p.threshold)), p.to_dense(), bias)
            tol = 1e-4 * float(ref.abs().max()) + 1e-5
            assert (p.linear(x[:batch], bias, backend="torch") - ref).abs().max() <= tol  # the pure-torch path
            if not has_extension():
                continue
            assert (p.linear(x[:batch], bias) - ref).abs().max() <= tol
            assert (p.op_linear(x[:batch], bias) - ref).abs().max() <= tol
            if batch < 140:
                for isa in _isas():
                    for threads in (1, 2):  # two threads: each sums its share of the columns, then the parts
                        y = inference_ops.call("colmask_linear", p._static(), x[:batch], bias, isa=isa, threads=threads)
                        assert (y - ref).abs().max() <= tol, (isa, threads, batch, act)


@pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")
def test_large_layer_splits_columns_between_threads():
    w = _weight(1000, 700, seed=4)
    x = torch.randn(1, 700, generator=torch.Generator().manual_seed(5))
    p = DenseColumnWeight.from_dense(w, float(x.abs().quantile(0.4)), "int8")
    ref = torch.nn.functional.linear(sparsify_input(x, float(p.threshold)), p.to_dense())
    for threads in (1, 2, 3):
        y = inference_ops.call("colmask_linear", p._static(), x, None, threads=threads)
        assert (y - ref).abs().max() <= 1e-4 * float(ref.abs().max())


def test_state_dict_round_trip_and_bad_files():
    w = _weight(24, 40)
    p = DenseColumnWeight.from_dense(w, 0.3, "int8")
    layer = PackedLinear(40, 24, None, p.format, p)
    other = PackedLinear(40, 24, None, p.format, DenseColumnWeight.from_dense(_weight(24, 40, seed=1), 0.1, "int8"))
    state = load(save(layer.state_dict()))
    other.load_state_dict(state)
    assert torch.equal(other.packed.to_dense(), p.to_dense()) and float(other.packed.threshold) == pytest.approx(0.3)
    before = other.packed.to_dense()
    bad = [({"packed.values": state["packed.values"][:-1]}, "W transposed"),
           ({"packed.values": state["packed.values"].float()}, "same value type"),
           ({"packed.scales": -state["packed.scales"]}, "positive"),
           ({"packed.scales": state["packed.scales"][:-1]}, "positive"),
           ({"packed.threshold": torch.tensor(float("nan"))}, "threshold")]
    for change, match in bad:
        with pytest.raises(SparsityError, match=match):
            other.load_state_dict({**state, **change})
        assert torch.equal(other.packed.to_dense(), before)  # refused before anything was copied


def test_bad_input():
    with pytest.raises(SparsityError, match="finite"):
        DenseColumnWeight.from_dense(torch.ones(4, 4), float("nan"))
    with pytest.raises(SparsityError, match="unknown value type"):
        DenseColumnWeight.from_dense(torch.ones(4, 4), 0.1, "int4")
    with pytest.raises(SparsityError, match="NaN"):
        DenseColumnWeight.from_dense(torch.full((4, 4), float("nan")), 0.1)
