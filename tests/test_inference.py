"""to_inference: outputs equal the masked dense model, the original is untouched, kernels are measured."""
import warnings

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, SparsityWarning
from sparsetorch.inference.fused_chain import FusedChain
from sparsetorch.inference import PackedConv2d, PackedLinear, clear_kernel_cache
from sparsetorch.inference.convert import detect_structure
from sparsetorch.kernels import has_extension
from sparsetorch.core.masks import get_mask, set_mask
from sparsetorch.models import MLP, SmallCNN
from sparsetorch.core.patterns import pattern_mask

FAST = {"budget_s": 0.005}


def pruned_mlp(sparsity=0.9, sizes=(64, 256, 256, 10)):
    torch.manual_seed(0)
    model = MLP(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        sparsetorch.prune(model, sparsity, generator=torch.Generator().manual_seed(0))
    return model


def assert_same(a, b):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-5 * (1 + float(b.abs().max()))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_mlp_outputs_match_and_original_untouched(batch):
    model = pruned_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
    inf = sparsetorch.to_inference(model, x, **FAST)
    assert inf is not model
    with torch.no_grad():
        assert_same(inf(x), model(x))
        assert_same(inf(x[:1]), model(x[:1]))  # other batch sizes still run (on the same kernels)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert get_mask(model.fc1) is not None and isinstance(model.fc1, nn.Linear)
    assert not any(p.requires_grad for p in inf.parameters()) and not inf.training
    plan = {row["layer"]: row for row in inf.sparsetorch_plan}
    assert set(plan) >= {"fc1", "fc2"}
    for name, row in plan.items():
        if row.get("fused_into"):  # the layer now runs inside a FusedChain
            assert isinstance(inf.get_submodule(row["fused_into"]), FusedChain)
            assert not hasattr(inf, name)
            continue
        module = inf.get_submodule(name) if row["type"] != "FusedChain" or row["kernel"] != "per-layer" else None
        if row["type"] == "FusedChain":
            assert module is None or isinstance(module, FusedChain)
            assert row["layers"][0] in plan
            if row["ms"]:
                assert set(row["ms"]) >= {"per-layer", "fused"}
                assert row["kernel"] == min(row["ms"], key=row["ms"].get)
            continue
        assert isinstance(module, nn.Linear) == (row["kernel"] == "dense")
        if row["ms"]:  # measured (not a cache hit): the chosen kernel is the fastest measured one
            assert row["kernel"] == min(row["ms"], key=row["ms"].get)
            assert "torch-csr" in row["ms"] and ("csr" in row["ms"]) == has_extension()


def test_choice_cache_hit():
    clear_kernel_cache()
    model = pruned_mlp()
    x = torch.randn(4, 64)
    first = sparsetorch.to_inference(model, x, **FAST).sparsetorch_plan
    second = sparsetorch.to_inference(model, x, **FAST).sparsetorch_plan
    assert all(row["ms"] for row in first)
    assert [r["kernel"] for r in first] == [r["kernel"] for r in second] and not any(r["ms"] for r in second)


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setenv("SPARSETORCH_DISABLE_EXT", "1")
    clear_kernel_cache()
    model = pruned_mlp()
    x = torch.randn(8, 64)
    inf = sparsetorch.to_inference(model, x, **FAST)
    with torch.no_grad():
        assert_same(inf(x), model(x))
    for row in inf.sparsetorch_plan:
        assert set(row["ms"]) <= {"dense", "torch-csr"} and row["kernel"] in {"dense", "torch-csr"}
    clear_kernel_cache()


def test_decode_times_kernels_cold_once_the_weights_outgrow_the_cache(monkeypatch):
    from sparsetorch.inference import convert, kernel_choice

    colds = []
    real = convert.time_candidates
    monkeypatch.setattr(convert, "time_candidates",
                        lambda fns, b, cuda, cold=False: colds.append(cold) or real(fns, b, cuda, cold))
    monkeypatch.setattr(kernel_choice, "EVICT_BYTES", 1 << 20)  # the buffer read before each timed call
    model, x = pruned_mlp(), torch.randn(1, 64)
    clear_kernel_cache()
    sparsetorch.to_inference(model, x, decode=True, **FAST)  # ~0.4 MB of weights: stays in cache at decode
    assert colds and not any(colds)
    monkeypatch.setattr(convert, "EVICT_BYTES", 1000)  # as if the cache were smaller than the weights
    colds.clear()
    clear_kernel_cache()
    inf = sparsetorch.to_inference(model, x, decode=True, **FAST)
    assert colds and all(colds)
    with torch.no_grad():
        assert_same(inf(x), model(x))
    clear_kernel_cache()


def test_chosen_kernel_is_used_when_it_wins():
    # a 99% sparse 512x512 layer at batch 1: some sparse kernel must beat dense on any CPU
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(512, 512))
    set_mask(model[0], torch.rand(512, 512) < 0.01)
    x = torch.randn(1, 512)
    inf = sparsetorch.to_inference(model, x, budget_s=0.05)
    assert isinstance(inf[0], PackedLinear) and inf[0].kernel != "dense"
    with torch.no_grad():
        assert_same(inf(x), model(x))


def test_structured_patterns_are_detected_and_correct():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    set_mask(model[0], pattern_mask(model[0].weight.abs(), 0.5, "2:4"))
    set_mask(model[2], pattern_mask(model[2].weight.abs(), 0.25, "block:8x8"))
    assert detect_structure(model[0].weight.detach())["nm"] == (2, 4)
    assert (8, 8) in detect_structure(model[2].weight.detach())["blocks"]
    x = torch.randn(5, 64)
    inf = sparsetorch.to_inference(model, x, **FAST)
    rows = {r["layer"]: r for r in inf.sparsetorch_plan}
    if has_extension() and rows["0"]["ms"]:
        assert "nm:2:4" in rows["0"]["ms"] and "bsr:8x8" in rows["2"]["ms"]
    with torch.no_grad():
        assert_same(inf(x), model(x))


def test_conv_model_and_unsupported_layers(tiny_net):
    model = SmallCNN(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        sparsetorch.prune(model, 0.8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 8, 8)
    inf = sparsetorch.to_inference(model, x, **FAST)
    assert any(isinstance(m, (PackedConv2d, nn.Conv2d)) for m in inf.modules())
    with torch.no_grad():
        assert_same(inf(x), model(x))
    # TinyNet has a Conv1d: no sparse kernel, so it stays dense with a warning, and outputs still match
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        sparsetorch.prune(tiny_net, 0.7, generator=torch.Generator().manual_seed(0))
    xb = torch.randn(2, 4, 4, 4)
    with pytest.warns(SparsityWarning, match="conv1d"):
        inf = sparsetorch.to_inference(tiny_net, xb, **FAST)
    assert isinstance(inf.conv1d, nn.Conv1d)
    with torch.no_grad():
        assert_same(inf(xb), tiny_net(xb))


def test_sparse_conv2d_forces_unfold_path():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    set_mask(conv, torch.rand_like(conv.weight) < 0.3)
    w = conv.weight.detach().reshape(5, -1)
    from sparsetorch.kernels import pack

    backend = "csr" if has_extension() else "torch-csr"
    sc = PackedConv2d(conv, PackedLinear(27, 5, conv.bias, backend, pack(w)))
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert_same(sc(x), conv(x))


def test_root_linear_and_bad_input():
    torch.manual_seed(4)
    lin = nn.Linear(300, 200)
    set_mask(lin, torch.rand(200, 300) < 0.02)
    x = torch.randn(2, 300)
    inf = sparsetorch.to_inference(lin, x, **FAST)
    with torch.no_grad():
        assert_same(inf(x), lin(x))
    with pytest.raises(SparsityError):
        sparsetorch.to_inference(lin, "not a tensor")
    with pytest.raises(SparsityError):
        sparsetorch.to_inference("not a model", x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_semi_structured_and_bsr():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().half()
    set_mask(model[0], pattern_mask(model[0].weight.abs().float(), 0.5, "2:4"))
    set_mask(model[2], pattern_mask(model[2].weight.abs().float(), 0.1, "block:16x16"))
    x = torch.randn(64, 512, device="cuda", dtype=torch.half)
    inf = sparsetorch.to_inference(model, x, budget_s=0.05)
    rows = {r["layer"]: r for r in inf.sparsetorch_plan}
    assert "semi-structured" in rows["0"]["ms"]  # documented for fp16 on sm80+
    assert "cuda-bsr:16x16" in rows["2"]["ms"] or "cuda-bsr:16x16" in rows["2"]["skipped"]  # tried either way
    with torch.no_grad():
        ref = model(x).float()
        assert float((inf(x).float() - ref).abs().max()) <= 2e-2 * (1 + float(ref.abs().max()))


def test_sequence_inputs_and_non_contiguous():
    # [B, T, C] activations (transformer-style): the batch the kernels see is B*T
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(96, 200), nn.GELU(), nn.Linear(200, 96))
    for layer in (model[0], model[2]):
        set_mask(layer, torch.rand_like(layer.weight) < 0.05)
    x = torch.randn(3, 7, 96)
    inf = sparsetorch.to_inference(model, x, **FAST)
    assert {r["batch"] for r in inf.sparsetorch_plan} == {21}
    with torch.no_grad():
        assert_same(inf(x), model(x))
        xt = torch.randn(96, 5).t()  # non-contiguous 2-D input
        assert_same(inf(xt), model(xt))


def test_old_layer_names_are_deprecated_aliases():
    import sparsetorch.inference as inference

    with pytest.warns(DeprecationWarning, match="PackedLinear"):
        assert inference.SparseLinear is PackedLinear
    with pytest.warns(DeprecationWarning, match="PackedConv2d"):
        assert inference.SparseConv2d is PackedConv2d


def test_timing_torch_candidates_leaves_no_second_copy_of_the_weight():
    # torch-csr is timed on the same CSRWeight as csr; the torch sparse tensor it caches (8 bytes per kept value)
    # must not stay on the layer that won on our kernel
    from sparsetorch.inference.convert import _drop_torch_copies
    from sparsetorch.kernels.packed import CSRWeight, PackedWeight

    w = torch.randn(64, 128) * (torch.rand(64, 128) < 0.2)
    ours, theirs = CSRWeight.from_dense(w), CSRWeight.from_dense(w)
    model = nn.ModuleList([PackedLinear(128, 64, None, "csr", ours), PackedLinear(128, 64, None, "torch-csr", theirs)])
    x = torch.randn(3, 128)
    ours.linear(x, backend="torch")  # what timing the torch-csr candidate does to the shared weight
    theirs.linear(x, backend="torch")
    assert ours._torch_cache is not None and theirs._torch_cache is not None
    _drop_torch_copies(model)
    assert ours._torch_cache is None and theirs._torch_cache is not None  # torch's layer still needs its copy
    inf = sparsetorch.to_inference(pruned_mlp(0.8), torch.randn(4, 64), **FAST)
    for m in inf.modules():
        if isinstance(m, PackedLinear) and m.kernel != "dense" and m._backend == "ext":
            assert isinstance(m.packed, PackedWeight) and m.packed._torch_cache is None
