"""Activation sparsity (TEAL): calibrated thresholds, the column kernel (csrc/decode_columns.inc) against torch,
and to_inference(..., activation_sparsity=...) against the masked dense model with the same thresholds."""
import warnings

import pytest
import torch
from safetensors.torch import load, save

import sparsetorch
from sparsetorch.errors import SparsityError
from sparsetorch.inference import ActivationSparsity, SparsifiedInputLinear, calibrate_activation_sparsity
from sparsetorch.inference.activation_sparsity import magnitude_threshold
from sparsetorch.kernels import has_extension, inference_ops
from sparsetorch.kernels.column_bitmask import ColumnBitmaskWeight, sparsify_input


def _weight(out, n, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    w[torch.rand(out, n, generator=g) < sparsity] = 0
    return w


def _isas():
    if not has_extension():
        return []
    return ["generic", "avx2", "avx512"][:inference_ops.isa_level() + 1]


@pytest.mark.parametrize("shape", [(37, 100), (300, 129), (512, 48)])
@pytest.mark.parametrize("values", ["fp32", "bf16", "fp16", "int8"])
def test_column_kernel_matches_torch(shape, values):
    out, n = shape
    w = _weight(out, n, 0.6)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2))
    for act in (0.0, 0.5):
        x = torch.randn(11, n, generator=torch.Generator().manual_seed(3))
        p = ColumnBitmaskWeight.from_dense(w, magnitude_threshold(x, act), values)
        if values == "fp32":
            assert torch.equal(p.to_dense(), w)
        if has_extension():
            assert torch.equal(p.unpack_t(), p.to_dense().t())
        for batch in (1, 2, 3, 11):  # the kernel's pieces of 1, 2, 2 + 1 and 8 + 2 + 1 batch rows
            ref = torch.nn.functional.linear(sparsify_input(x[:batch], float(p.threshold)), p.to_dense(), bias)
            tol = 1e-4 * float(ref.abs().max()) + 1e-5
            assert (p.linear(x[:batch], bias, backend="torch") - ref).abs().max() <= tol  # the pure-torch path
            for isa, skip in [(i, s) for i in _isas() for s in (True, False)]:
                p.skip_columns = skip  # read the kept columns only, or stream all with zeros multiplied
                threads = 2 if batch == 11 and isa == _isas()[-1] else 1  # mostly one: busy machines wake slowly
                y = inference_ops.call("colmask_linear", p._static(), x[:batch], bias, isa=isa, threads=threads)
                assert (y - ref).abs().max() <= tol, (isa, skip, batch, act)


@pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")
def test_column_prefill_rows_use_the_rebuilt_weight():
    w = _weight(40, 70, 0.5)
    x = torch.randn(130, 70, generator=torch.Generator().manual_seed(1))  # >= prefill_rows: unpack + GEMM
    p = ColumnBitmaskWeight.from_dense(w, 0.3)
    ref = torch.nn.functional.linear(sparsify_input(x, 0.3), w)
    assert torch.allclose(p.linear(x), ref, rtol=1e-4, atol=1e-5)


def test_magnitude_threshold_reaches_the_fraction():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    for s in (0.0, 0.25, 0.5, 0.9):
        t = magnitude_threshold(x, s)
        assert abs(float((sparsify_input(x, t) == 0).float().mean()) - s) <= 1e-3


def _tiny_llama(hidden=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=120, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=300)).eval()
    with torch.no_grad():  # half of every block weight pruned by magnitude per row
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                w = mod.weight
                w.mul_(w.abs() > w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values)
    return model


def _ids(n, t, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def test_calibration_reaches_the_target_on_its_data():
    pytest.importorskip("transformers")
    model, calib = _tiny_llama(), _ids(4, 24)
    act = calibrate_activation_sparsity(model, calib, sparsity=0.4)
    assert "lm_head" not in act.thresholds and len(act.thresholds) == 14  # 7 per block, the head left dense
    t = act.thresholds
    assert t["model.layers.0.self_attn.q_proj"] == t["model.layers.0.self_attn.v_proj"]  # one shared input
    zeros = {}

    def count(name):
        def hook(mod, inp):  # runs after the thresholding hook: it was registered later
            zeros[name] = float((inp[0] == 0).float().mean())
        return hook

    with act.attach(model), torch.no_grad():
        hooks = [m.register_forward_pre_hook(count(n)) for n, m in model.named_modules() if n in t]
        model(calib)
    for h in hooks:
        h.remove()
    assert set(zeros) == set(t) and all(abs(z - 0.4) < 0.01 for z in zeros.values()), zeros
    mlp = calibrate_activation_sparsity(model, calib, sparsity=0.4, include=["*.mlp.*", "lm_head"])
    assert len(mlp.thresholds) == 7 and "lm_head" in mlp.thresholds  # include as everywhere (docs/api.md)


def test_state_dict_round_trip():
    pytest.importorskip("transformers")
    model = _tiny_llama()
    act = calibrate_activation_sparsity(model, _ids(2, 16), sparsity=0.5)
    back = ActivationSparsity.from_state_dict(load(save(act.state_dict())))
    assert back.thresholds == act.thresholds and back.in_features == act.in_features and back.sparsity == 0.5
    other = calibrate_activation_sparsity(model, _ids(2, 16, seed=1), sparsity=0.3)
    other.load_state_dict(act.state_dict())
    assert other.thresholds == act.thresholds
    with pytest.raises(SparsityError, match="pairs"):
        ActivationSparsity.from_state_dict({"sparsity": torch.tensor(0.4), "fc.threshold": torch.tensor(0.1)})


@pytest.mark.parametrize("faster", ["bitmask-columns", "dense-columns", "rows", "rows-shared"])
def test_to_inference_matches_masked_dense_with_thresholds(faster, monkeypatch, unfused):
    """Each thresholded layer runs on the column kernel over its kept values in tiles, over all its values in
    whole columns, or on a row kernel behind the same threshold (SparsifiedInputLinear), whichever is timed
    fastest; siblings (q/k/v, gate/up) that chose otherwise alone share one call on dense columns where that
    is faster ("rows-shared"): each gives the masked dense model's outputs with the thresholds applied."""
    pytest.importorskip("transformers")
    warnings.simplefilter("ignore")
    from sparsetorch.inference import clear_kernel_cache, convert, sibling_choice

    real = convert.time_candidates
    alone = faster.partition("-shared")[0]

    def rigged(fns, *args, **kwargs):  # the layout races decided by `faster`; other timings real
        times = real(fns, *args, **kwargs)
        if "apart" in fns:  # the siblings' shared call against their choices alone
            assert set(fns) == {"apart", "dense-columns"}
            return {k: float(k != ("dense-columns" if faster.endswith("-shared") else "apart")) for k in fns}
        if "bitmask-columns" not in fns:
            return times
        assert "dense-columns" in fns and sum(k.startswith("rows/") for k in fns) == 1
        return {k: float(k.partition("/")[0] != alone) for k in fns}

    monkeypatch.setattr(convert, "time_candidates", rigged)
    monkeypatch.setattr(sibling_choice, "time_candidates", rigged)
    clear_kernel_cache()
    model, ids = _tiny_llama(), _ids(3, 10, seed=5)
    act = calibrate_activation_sparsity(model, _ids(4, 24), sparsity=0.4)
    fast = sparsetorch.to_inference(model, (ids[:1],), activation_sparsity=act)
    thresholded = [r for r in fast.sparsetorch_plan if r["layer"] != "lm_head" and r["type"] != "SiblingLinear"]
    kernels = {r["kernel"] for r in thresholded}  # (the dense head is timed apart)
    groups = [r for r in fast.sparsetorch_plan if r["type"] == "SiblingLinear"]
    if not has_extension():
        assert kernels == {"torch-bitmask-columns"}
    elif faster == "rows-shared":  # o_proj and down_proj alone on rows
        assert all(r["kernel"].startswith("rows/") for r in thresholded if r["layer"].endswith(("o_proj", "down_proj")))
        assert {r["kernel"] for r in thresholded if not r["layer"].endswith(("o_proj", "down_proj"))} == {"dense-columns"}
    elif faster != "rows":
        assert kernels == {faster}
    else:
        assert all(k.startswith("rows/") for k in kernels)
        assert all(isinstance(fast.get_submodule(r["layer"]), SparsifiedInputLinear) for r in thresholded)
    if has_extension() and faster in ("dense-columns", "rows-shared"):  # q/k/v and gate/up share one threshold
        assert [len(r["members"]) for r in groups] == [3, 2, 3, 2]
        assert {r["kernel"] for r in groups} == {"dense-columns (one call)"}
        apart = unfused(fast)  # each sibling on its own view of the group's columns (strided)
        assert apart.get_submodule(groups[0]["members"][1]).packed.values.stride(0) > 64
        with torch.no_grad():
            assert torch.allclose(apart(ids).logits, fast(ids).logits, rtol=1e-5, atol=1e-5)
    else:
        assert groups == []
    with torch.no_grad(), act.attach(model):
        ref_logits, ref_tokens = model(ids).logits, model.generate(ids[:2], max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        logits, tokens = fast(ids).logits, fast.generate(ids[:2], max_new_tokens=12, do_sample=False)
    # float order only: the kernels sum the same products in another order (fp32)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert torch.equal(tokens, ref_tokens)  # batch 2: the small-batch path of the column kernel
    # the converted model saves and loads like any other (thresholds included)
    again = sparsetorch.to_inference(model, (ids[:1],), activation_sparsity=act)
    again.load_state_dict(load(save({k: v.contiguous() for k, v in fast.state_dict().items()})))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    if faster == "bitmask-columns":  # (the row kernels' own files are tested with them)
        state = fast.state_dict()
        key = next(k for k in state if k.endswith("packed.mask"))
        state[key] = state[key].clone().fill_(-1)  # bits past the outputs / counts that disagree with the starts
        with pytest.raises(SparsityError):
            again.load_state_dict(state)
    if faster == "dense-columns":
        state = fast.state_dict()
        key = next(k for k in state if k.endswith("packed.values"))
        state[key] = state[key][:-1]  # a column short: the kernel would read past it
        with pytest.raises(SparsityError, match="W transposed"):
            again.load_state_dict(state)
    clear_kernel_cache()  # the rigged choices stay in this test


def test_bad_input():
    pytest.importorskip("transformers")
    model = _tiny_llama()
    for bad in (1.0, -0.1, "0.4"):
        with pytest.raises(SparsityError, match=r"\[0, 1\)"):
            calibrate_activation_sparsity(model, _ids(2, 8), sparsity=bad)
    for bad in (None, torch.zeros(0, 8, dtype=torch.long), ()):
        with pytest.raises(SparsityError, match="calibration data"):
            calibrate_activation_sparsity(model, bad)
    act = calibrate_activation_sparsity(model, _ids(2, 8))
    with pytest.raises(SparsityError, match="different model"):
        sparsetorch.to_inference(_tiny_llama(hidden=32), (_ids(1, 4),), activation_sparsity=act)
    with pytest.raises(SparsityError, match="calibrate_activation_sparsity"):
        sparsetorch.to_inference(model, (_ids(1, 4),), activation_sparsity={"x": 0.1})
    with pytest.raises(SparsityError, match="finite"):
        ColumnBitmaskWeight.from_dense(torch.ones(4, 4), float("nan"))
