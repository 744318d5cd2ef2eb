"""Shrunk transformers in ONNX and the edge runtime: every kind of cut (depth, heads, MLP width, hidden size,
experts; uniform and per-block widths) exports, and the exported model gives torch's logits."""
import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import sparsetorch  # noqa: E402
from sparsetorch.errors import SparsityError  # noqa: E402
from sparsetorch.export import DecoderLogits  # noqa: E402
from sparsetorch.shrink import (from_pretrained, remove_blocks, remove_experts, remove_heads,  # noqa: E402
                                remove_hidden, remove_mlp_channels, save_pretrained)
from test_shrink_width import gpt2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))  # another batch and length
CALIB = [IDS]


def llama(**kw):
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(num_local_experts=16, num_experts_per_tok=1, num_hidden_layers=2, hidden_size=32,
                                     intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def onnx_matches_torch(model, path, example=IDS):
    """Export through DecoderLogits with a dynamic sequence; onnxruntime gives torch's logits on other inputs."""
    wrapped = DecoderLogits(model)
    sparsetorch.export_onnx(wrapped, example, path, dynamic_sequence=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for ids in (IDS, OTHER):
        with torch.no_grad():
            expected = wrapped(ids).numpy()
        got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    return wrapped.unwrap()


def test_llama_shrunk_every_way_exports_to_onnx(tmp_path):
    model = llama()
    remove_blocks(model, 1, CALIB)
    remove_heads(model, 0.5, CALIB)  # one of the two key/value groups
    remove_mlp_channels(model, 0.25, CALIB)
    remove_hidden(model, 0.25, CALIB)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.intermediate_size,
            model.config.hidden_size) == (2, 1, 36, 24)
    onnx_matches_torch(model, tmp_path / "uniform.onnx")
    query = llama(num_attention_heads=8, num_key_value_heads=2)
    remove_heads(query, 0.5, CALIB, unit="query")  # two of the four query heads of each group
    onnx_matches_torch(query, tmp_path / "query.onnx")


def test_per_block_widths_from_the_loader_export_to_onnx(tmp_path):
    model = llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:30] = 0  # block 0's neurons are the weakest
    remove_mlp_channels(model, 0.5, CALIB, per_layer=True)
    remove_heads(model, 0.5, CALIB, per_layer=True, unit="query")
    loaded = from_pretrained(save_pretrained(model, tmp_path / "small"))
    widths = [layer.mlp.up_proj.out_features for layer in loaded.model.layers]
    assert len(set(widths)) > 1
    onnx_matches_torch(loaded, tmp_path / "per_block.onnx")


def test_gpt2_shrunk_heads_mlp_hidden_exports_to_onnx(tmp_path):
    model = gpt2()
    remove_heads(model, 1, CALIB)
    remove_mlp_channels(model, 0.25, CALIB)
    remove_hidden(model, 0.25, CALIB)
    assert model.transformer.h[0].attn.num_heads == 3 and model.transformer.wte.weight.shape == (64, 24)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "small"))  # GPT-2 heads need the loader
    onnx_matches_torch(loaded, tmp_path / "gpt2.onnx")


def test_mixtral_with_half_its_experts_exports_to_onnx(tmp_path):
    model = mixtral()
    remove_experts(model, 0.5, CALIB)
    assert model.config.num_local_experts == 8
    before = model.get_experts_implementation()
    # 4 example tokens (top-1) reach at most 4 of the 8 experts: a graph traced through transformers' "eager"
    # expert loop would hold only those and be wrong on OTHER's tokens
    model = onnx_matches_torch(model, tmp_path / "moe.onnx", example=IDS[:, :2])
    assert model.get_experts_implementation() == before  # unwrap gives the model its own implementation back


def test_a_length_baked_in_by_the_tracer_is_refused(tmp_path):
    class Baked(nn.Module):
        def forward(self, x):  # int(): the tracer records the example's length as a constant
            return x + torch.arange(int(x.shape[1]), dtype=x.dtype)

    x = torch.randn(2, 5)
    sparsetorch.export_onnx(Baked(), x, tmp_path / "fixed.onnx")  # one length only: fine
    with pytest.raises(SparsityError, match="one shorter"):
        sparsetorch.export_onnx(Baked(), x, tmp_path / "dynamic.onnx", dynamic_sequence=True)
    assert not (tmp_path / "dynamic.onnx").exists()
    with pytest.raises(SparsityError, match="causal LM"):
        DecoderLogits(nn.Linear(2, 2))


def test_byte_gpt_with_per_block_widths_exports_to_onnx(tmp_path):
    from sparsetorch.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=3, width=32, heads=4, context=16)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    remove_blocks(model, 1, [ids])
    remove_heads(model, 1, [ids], per_layer=True)
    remove_mlp_channels(model, 0.25, [ids], per_layer=True)
    remove_hidden(model, 0.25, [ids])
    path = sparsetorch.export_onnx(model, ids, tmp_path / "gpt.onnx", dynamic_sequence=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(other).numpy()
    np.testing.assert_allclose(session.run(None, {"input_0": other.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
