"""Bitmask decode kernels (csrc/decode_impl.inc, csrc/decode_vnni.cpp) against torch on the same weights."""
import pytest
import torch

from sparsetorch.errors import SparsityError
from sparsetorch.kernels import has_extension, inference_ops
from sparsetorch.kernels.bitmask_weight import BitmaskWeight, has_vnni, pack_mask, quantize_activations, unpack_mask

pytestmark = pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")


def _weight(out, n, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    w[torch.rand(out, n, generator=g) < sparsity] = 0
    return w


def test_mask_round_trip():
    keep = torch.rand(7, 37, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(unpack_mask(pack_mask(keep), 37), keep)


@pytest.mark.parametrize("shape", [(37, 100), (64, 128), (130, 300)])
@pytest.mark.parametrize("values", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("dense", [False, True])
def test_matches_dequantized_weight(shape, values, dense):
    out, n = shape
    w = _weight(out, n, 0.7)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2))
    group = 64 if values == "int8" and out % 2 == 0 else None
    p = BitmaskWeight.from_dense(w, values, group_size=group, dense=dense)
    if values == "fp32":
        assert torch.equal(p.to_dense(), w)
    assert torch.allclose(p.unpack(), p.to_dense())
    isas = inference_ops.ISAS[:inference_ops.isa_level() + 1]  # every ISA this CPU runs
    for batch in (1, 3, 8, 11):
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
        ref = torch.nn.functional.linear(x, p.to_dense(), bias)
        # dense int8 at decode batch sizes runs on 16-bit activation codes on AVX2 (rounding 2^-16 of max|x|):
        # its error is bounded by the output's scale rather than each output's size
        atol = 1e-4 * max(1.0, float(ref.abs().max())) if values == "int8" else 1e-4
        for isa in isas:
            y = inference_ops.call("bitmask_linear", p._static(), x, bias, isa=isa)
            assert torch.allclose(y, ref, rtol=1e-4, atol=atol), (isa, batch)


def _two_of_four(out, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    top = w.abs().reshape(out, n // 4, 4).topk(2, dim=2).indices
    keep = torch.zeros(out, n // 4, 4, dtype=torch.bool).scatter_(2, top, True).reshape(out, n)
    return w * keep


@pytest.mark.parametrize("values,group", [("fp32", None), ("bf16", None), ("int8", None), ("int8", 64)])
def test_two_of_four_rows_and_rows_that_only_keep_half(values, group):
    """Batch 1 on AVX2 takes words whose bytes each keep 4 of 8 columns (2:4, 4:8) eight values at a time
    (group24_avx2); a row keeping half its columns that stops being so part-way falls back to the general kernel
    from there. Every row against torch on the same weight."""
    w = _two_of_four(24, 512)
    w[5, -64:] = 0  # half its columns, but its last 64 keep 1 of 4 and then 3 of 4
    w[5, -64:-32:4] = 1.0
    w[5, -32:] = (torch.arange(32.0) + 1) * torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(8)
    w[9, 0:8] = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0])  # 3 of 4 and 1 of 4: 4 of 8 still
    assert all(int((w[r] != 0).sum()) == 256 for r in (5, 9))
    p = BitmaskWeight.from_dense(w, values, group_size=group)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(3))
    ref = torch.nn.functional.linear(x, p.to_dense(), bias)
    for isa in inference_ops.ISAS[:inference_ops.isa_level() + 1]:
        y = inference_ops.call("bitmask_linear", p._static(), x, bias, isa=isa)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), isa


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("group", [None, 64, 128])
@pytest.mark.parametrize("shape", [(96, 320), (33, 1000), (130, 2048)])
def test_int8_activations_match_their_quantization(isa, dense, group, shape, monkeypatch):
    """The int8 x int8 kernels, VNNI (avx512) and AVX2 (csrc/decode_q8_avx2.cpp), on every one this CPU runs."""
    level = ("generic", "avx2", "avx512").index(isa)
    if level > inference_ops.isa_level() or (isa == "avx512" and not has_vnni()):
        pytest.skip(f"this CPU has no {'AVX-512 VNNI' if isa == 'avx512' else isa}")
    monkeypatch.setattr(inference_ops, "isa_level", lambda: level)
    out, n = shape
    w = _weight(out, n, 0.7)
    p = BitmaskWeight.from_dense(w, "int8", group_size=group, quantize_input=True, dense=dense)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2))
    for batch in (1, 2, 5, 8):
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
        x[:, 3] = 0.0
        # the kernel is exact up to float order on the activations as quantize_activations rounds them
        ref = torch.nn.functional.linear(quantize_activations(x), p.to_dense(), bias)
        assert torch.allclose(p.linear(x, bias), ref, rtol=1e-5, atol=1e-4 * ref.abs().max()), batch


def test_activation_quantization_error():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    x[:, 10] = 100.0  # an outlier coarsens its own 256 columns only
    q = quantize_activations(x)
    err = (q - x).abs()
    assert err[:, :256].max() <= 100.0 / 255 / 2 * 1.0001
    assert err[:, 256:].max() <= x[:, 256:].abs().max() / 255 / 2 * 1.0001
    assert torch.equal(torch.sign(q[q != 0]), torch.sign(x[q != 0]))
    assert torch.equal(quantize_activations(torch.zeros(2, 300)), torch.zeros(2, 300))


def test_bad_input():
    with pytest.raises(SparsityError, match="unknown value type"):
        BitmaskWeight.from_dense(torch.ones(4, 16), "int4")
    with pytest.raises(SparsityError, match="NaN"):
        BitmaskWeight.from_dense(torch.full((4, 16), float("nan")))
    with pytest.raises(SparsityError, match="multiple of 64"):
        BitmaskWeight.from_dense(torch.ones(4, 128), "int8", group_size=48, quantize_input=True)


def test_to_inference_decoder_values(pruned_llama):
    import sparsetorch

    model = pruned_llama()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    fast = sparsetorch.to_inference(model, (ids,), budget_s=0.02)
    assert all(p["batch"] == 1 for p in fast.sparsetorch_plan if p["type"] != "SiblingLinear")  # a decoder is timed on one row (decode)
    head = next(p for p in fast.sparsetorch_plan if p["layer"] == "lm_head")  # dense: our kernel vs torch's
    assert head["kernel"] in ("dense", "dense-fp32") and set(head["ms"]) in (set(), {"dense", "dense-fp32"})  # set(): cached
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False), ref)
    low = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="bf16")
    kinds = {p["kernel"] for p in low.sparsetorch_plan if p["type"] != "SiblingLinear"}
    assert kinds <= {"bitmask-bf16", "dense-bf16"} and "dense-bf16" in kinds  # lm_head in bf16 too
    with torch.no_grad():
        out = low(ids).logits
        assert (out - model(ids).logits).abs().max() < 0.05 * model(ids).logits.abs().max()
    with pytest.raises(SparsityError, match="unknown values"):
        sparsetorch.to_inference(model, (ids,), values="int3")


def _hostile(state, case):
    if case == "bits_past_in":
        state["mask"][0, -1] = -1  # 70 inputs: bits 6..15 of the last word are past the row
    elif case == "row_start_decreases":
        state["row_start"][1], state["row_start"][2] = state["row_start"][2] + 5, state["row_start"][1]
    elif case == "row_start_overruns":
        state["row_start"][-1] += 1000
    elif case == "popcount_differs":
        state["mask"][3, 0] ^= 1
    elif case == "scales_shape":
        state["scales"] = state["scales"][:, :1].clone()
    return state


@pytest.mark.parametrize("case", ["bits_past_in", "row_start_decreases", "row_start_overruns",
                                  "popcount_differs", "scales_shape"])
def test_hostile_state_is_refused_before_any_buffer_changes(case):
    """The kernels index values by row_start and advance by each mask word's popcount: a state_dict whose
    buffers disagree would read past the arrays, so load_state_dict refuses it and leaves the layer as it was."""
    w = _weight(12, 70, 0.6)
    layer = BitmaskWeight.from_dense(w, "int8", group_size=32)
    state = _hostile({k: v.clone() for k, v in layer.state_dict().items()}, case)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(SparsityError, match="corrupted"):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(2, 70)
    torch.testing.assert_close(layer.linear(x, backend="torch"), x @ layer.to_dense().t())


def test_clean_state_round_trips():
    w = _weight(12, 70, 0.6)
    for values in ("fp32", "bf16", "int8"):
        a, b = BitmaskWeight.from_dense(w, values), BitmaskWeight.from_dense(w * 2, values)
        b.load_state_dict(a.state_dict())
        assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_prefill_rows_and_the_unpack_into_a_reused_buffer(values):
    """From PREFILL_ROWS rows on, linear takes the prefill path (the panel kernel, or the weight rebuilt by the
    compiled unpack into a reused buffer for a dense GEMM): same answer as the dequantized weight; the unpack
    writes into a given buffer."""
    from sparsetorch.kernels import bitmask_weight as bwm
    w = _weight(48, 70, 0.6)
    layer = BitmaskWeight.from_dense(w, values)
    x = torch.randn(bwm.PREFILL_ROWS + 3, 70)
    torch.testing.assert_close(layer.linear(x), x @ layer.to_dense().t(), rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.unpack(), layer.to_dense())
    buf = torch.empty(48 * 70 + 5)
    assert layer.unpack(out=buf).data_ptr() == buf.data_ptr()
    with pytest.raises(SparsityError, match="buffer"):
        layer.unpack(out=torch.empty(10))


def test_dense_fp32_prefill_is_one_gemm_on_the_values(monkeypatch):
    """A dense fp32 layer (an lm_head) prefills straight from its values, eager or through its operator: no copy
    of W into the scratch buffer, which would stay allocated after (250 MiB for a 32000 x 2048 lm_head)."""
    from sparsetorch.kernels import bitmask_weight as bwm

    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(4))
    layer, bias = BitmaskWeight.from_dense(w, "fp32", dense=True), torch.randn(40)
    monkeypatch.setattr(inference_ops, "scratch", lambda n: pytest.fail("dense fp32 prefill copied its weight"))
    x = torch.randn(bwm.PREFILL_ROWS + 1, 70)
    want = torch.nn.functional.linear(x, w, bias)
    torch.testing.assert_close(layer.linear(x, bias), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.op_linear(x, bias), want, rtol=1e-5, atol=1e-5)  # the torch.compile operator


@pytest.mark.parametrize("values,group", [("fp32", None), ("bf16", None), ("fp16", None), ("int8", None), ("int8", 32)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_sparse_times_dense_kernel_for_many_rows(values, group, threads, isa, monkeypatch):
    """bitmask_many (X^T panels, each kept weight broadcast into them) equals the dequantized weight's product
    on every ISA this CPU runs: panel widths 16..128 and a partial last panel, inputs past one block of 1024,
    outputs past one tile of rows (SPMM_TILE_ROWS, 128) and a partial last tile, strided rows, bias."""
    level = ("generic", "avx2", "avx512").index(isa)
    if level > inference_ops.isa_level():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setattr(inference_ops, "isa_level", lambda: level)
    for out, n, sparsity, rows in [(37, 1100, 0.7, 77), (16, 70, 0.0, 16), (5, 2100, 0.95, 130), (300, 260, 0.5, 150)]:
        layer = BitmaskWeight.from_dense(_weight(out, n, sparsity), values, group_size=group)
        x = torch.randn(rows, n + 5)[:, :n]  # rows n + 5 apart
        bias = torch.randn(out)
        ref = x @ layer.to_dense().t() + bias
        y = inference_ops.bitmask_many(layer._static(), x, bias, threads)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_prefill_times_both_kernels_once_and_keeps_the_faster():
    layer = BitmaskWeight.from_dense(_weight(40, 300, 0.5), "fp32")
    x, static = torch.randn(200, 300), layer._static()
    ref = x @ layer.to_dense().t()
    torch.testing.assert_close(inference_ops.bitmask_prefill(static, x, None), ref, rtol=1e-4, atol=1e-4)
    key = (static, x.shape[0].bit_length())
    assert inference_ops._PREFILL_CHOICE[key] in ("spmm", "gemm")
    for forced in ("spmm", "gemm"):
        inference_ops._PREFILL_CHOICE[key] = forced
        torch.testing.assert_close(inference_ops.bitmask_prefill(static, x, None), ref, rtol=1e-4, atol=1e-4)
    del inference_ops._PREFILL_CHOICE[key]


def test_dense_int8_decode_on_activation_codes_keeps_small_inputs():
    """A dense int8 layer at decode batch sizes runs on 16-bit activation codes on AVX2 (rows_dense_i16_t), a
    scale per 256 columns: inputs spanning four decades (an LLM's outlier features beside the rest) keep their
    precision. Rows of 9000 inputs (a tail past the last 16), one weight scale per row and per 1024 columns; a
    NaN input gives NaN outputs."""
    w = _weight(6, 9000, 0.0, seed=3)
    x = torch.randn(3, 9000, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 1, 9000)
    for group in (None, 1024):
        p = BitmaskWeight.from_dense(w, "int8", group_size=group, dense=True)
        for batch in (1, 2, 3):
            ref = torch.nn.functional.linear(x[:batch], p.to_dense())
            y = inference_ops.call("bitmask_linear", p._static(), x[:batch], None)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    x[1, 4321] = float("nan")  # propagated as fp32 arithmetic would, not rounded away with the codes
    p = BitmaskWeight.from_dense(w, "int8", dense=True)
    assert inference_ops.call("bitmask_linear", p._static(), x[:2], None)[1].isnan().all()
