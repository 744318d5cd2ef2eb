"""One-shot pruning of transformers causal LMs built from tiny configs (random weights, nothing downloaded)."""
import pytest
import torch

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.core.masks import iter_masks
from sparsetorch.oneshot import prune_oneshot
from sparsetorch.oneshot.linear_layers import weight_2d
from sparsetorch.core.patterns import is_valid_mask

transformers = pytest.importorskip("transformers")
VOCAB = 256


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()  # eval: no dropout when comparing outputs


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                 vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return transformers.OPTForCausalLM(cfg).eval()


def _calib(n=4, seq=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n)]


def _check_masks(model, pattern, sparsity, expected_layers):
    masks = list(iter_masks(model))
    assert len(masks) == expected_layers
    for item in masks:
        assert "lm_head" not in item.fqn and "embed" not in item.fqn
        view = item.mask.t() if type(item.module).__name__ == "Conv1D" else item.mask  # [out, in]
        assert view.shape == weight_2d(item.module).shape
        assert is_valid_mask(view, pattern)
        assert (~item.mask).float().mean().item() == pytest.approx(sparsity)
        assert torch.all(item.param[~item.mask] == 0)


def test_gpt2_pruned_saved_reloaded_and_generating(tmp_path):
    model = _gpt2()
    x = _calib(1)[0]
    stats = sparsetorch.sparsegpt(model, _calib(), sparsity=0.5, progress=False).sparsetorch_stats
    assert stats.mode == "sequential" and stats.blocks == 2
    _check_masks(model, "unstructured", 0.5, expected_layers=8)  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(r.rel_error is not None and r.rel_error < 1 for r in stats.layers)
    logits = model(x).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert torch.allclose(reloaded(x).logits, logits, atol=1e-5)
    w = reloaded.transformer.h[0].mlp.c_fc.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5)
    out = reloaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    sparsetorch.save(model, tmp_path / "model.safetensors")
    fresh = _gpt2()
    sparsetorch.load(fresh, tmp_path / "model.safetensors")
    assert torch.allclose(fresh(x).logits, logits, atol=1e-5)


@pytest.mark.parametrize("make,layers", [(_llama, 14), (_opt, 12)])
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "4:8"), ("sparsegpt", "unstructured")])
def test_llama_and_opt_pruned(make, layers, method, pattern):
    model = make()
    x = _calib(1)[0]
    prune_oneshot(model, _calib(), method=method, pattern=pattern, sparsity=0.5, progress=False)
    _check_masks(model, pattern, 0.5, expected_layers=layers)
    assert torch.isfinite(model(x).logits).all()


def test_sequential_sees_pruned_inputs_and_beats_magnitude_on_outputs():
    """Block 1's statistics come from the pruned block 0; the whole pruned model tracks the dense one
    better with SparseGPT than with magnitude pruning."""
    dense = _gpt2()
    x = torch.cat(_calib(8))
    ref = dense(x).logits
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = _gpt2()
        prune_oneshot(model, _calib(8), method=method, sparsity=0.5, progress=False)
        errors[method] = (model(x).logits - ref).norm().item()
    assert errors["sparsegpt"] < errors["magnitude"]


def test_per_type_sparsity_and_dict_calibration():
    model = _llama()
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in _calib()]
    stats = prune_oneshot(model, calib, method="wanda", sparsity={"attn": 0.4, "mlp": 0.6}, progress=False).sparsetorch_stats
    for r in stats.layers:
        assert r.sparsity == pytest.approx(0.4 if "attn" in r.name else 0.6, abs=1e-3)


@pytest.mark.parametrize("bad", ["float", "3d", "vocab", "empty", "dict"])
def test_lm_bad_calibration(bad):
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = {"float": [torch.randn(2, 8)], "3d": [torch.zeros(1, 2, 8, dtype=torch.long)],
             "vocab": [torch.full((1, 8), VOCAB)], "empty": [], "dict": [{"ids": torch.zeros(1, 8)}]}[bad]
    with pytest.raises(SparsityError):
        sparsetorch.wanda(model, calib, progress=False)
    assert not list(iter_masks(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_on_gpu", [False, True])
def test_gpt2_pruned_on_cuda(model_on_gpu):
    """The math runs on CUDA; a CPU model gets its blocks moved there one at a time and back."""
    model = _gpt2()
    reference = _gpt2()
    if model_on_gpu:
        model.cuda()
    stats = sparsetorch.sparsegpt(model, _calib(), pattern="2:4", sparsity=None, device="cuda", progress=False).sparsetorch_stats
    assert stats.device.startswith("cuda") and stats.memory_kind == "cuda max allocated"
    assert stats.peak_memory_mb > 0
    home = "cuda" if model_on_gpu else "cpu"
    _check_masks(model, "2:4", 0.5, expected_layers=8)
    for item in iter_masks(model):
        assert item.mask.device.type == home and item.param.device.type == home
    prune_oneshot(reference, _calib(), method="sparsegpt", pattern="2:4", sparsity=None, device="cpu", progress=False)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.cpu(), b, atol=1e-3), name


def test_layers_outside_the_blocks_are_pruned_when_included_and_tied_heads_are_not():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=64)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    prune_oneshot(bert, calib, method="wanda", sparsity=0.5, include=["*"], progress=False)
    assert bert.sparsetorch_stats.mode == "sequential"
    names = {r.name for r in bert.sparsetorch_stats.layers}
    assert "pooler.dense" in names and len(names) == 2 * 6 + 1
    gpt2 = _gpt2()
    with pytest.warns(sparsetorch.SparsityWarning, match="tied"):
        prune_oneshot(gpt2, _calib(), method="wanda", sparsity=0.5, include=["*"], progress=False)
    assert "lm_head" not in {r.name for r in gpt2.sparsetorch_stats.layers}
    assert (gpt2.transformer.wte.weight != 0).all()
