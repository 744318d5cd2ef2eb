"""Shrinking transformers GPT-2 and Llama (built from a config): heads and MLP units."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparsetorch import SparsityWarning  # noqa: E402
from sparsetorch.shrink import load_shrunk, prune_channels, save_shrunk, shrink  # noqa: E402

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_config():
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)


def llama_config():
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=50, max_position_embeddings=64, bos_token_id=0,
                       eos_token_id=0)


def generate(model):
    return model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_gpt2_heads_and_mlp_shrink_and_generate(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    prune_channels(model, 0.5, example_inputs=IDS, scope="layer")
    small = shrink(model, IDS)
    attn = small.transformer.h[0].attn
    assert attn.num_heads == 2 and attn.c_attn.weight.shape == (32, 48) and attn.c_proj.weight.shape == (16, 32)
    assert small.transformer.h[1].mlp.c_fc.weight.shape == (32, 64)
    assert small.config.n_head == 2 and small.config.n_inner == 64
    torch.testing.assert_close(model(IDS).logits, small(IDS).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(generate(model), generate(small))
    loaded = load_shrunk(save_shrunk(small, tmp_path / "gpt2.safetensors"), lambda: GPT2LMHeadModel(gpt2_config()))
    loaded.eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    torch.testing.assert_close(loaded(IDS).logits, small(IDS).logits)


def test_gpt2_head_with_zero_values_but_a_bias_is_folded():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    attn = model.transformer.h[0].attn
    with torch.no_grad():  # head 1: zero value weights, nonzero value bias -> a constant output
        attn.c_attn.weight[:, 64 + 8: 64 + 16] = 0
        attn.c_attn.bias.normal_()
    small = shrink(model, IDS)
    assert small.transformer.h[0].attn.num_heads == 3 and small.transformer.h[1].attn.num_heads == 4
    torch.testing.assert_close(model(IDS).logits, small(IDS).logits, rtol=1e-4, atol=1e-5)


def test_llama_grouped_query_heads_and_gated_mlp(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    prune_channels(model, 0.5, example_inputs=IDS, scope="layer")
    small = shrink(model, IDS)
    attn = small.model.layers[0].self_attn
    # one of two key/value heads removed, with its two query heads
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16
    assert small.model.layers[0].mlp.up_proj.out_features == 32
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (2, 1, 8)
    torch.testing.assert_close(model(IDS).logits, small(IDS).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(generate(model), generate(small))
    loaded = load_shrunk(save_shrunk(small, tmp_path / "llama.safetensors"), lambda: LlamaForCausalLM(llama_config()))
    torch.testing.assert_close(loaded.eval()(IDS).logits, small(IDS).logits)


def test_llama_hidden_size_rows_are_not_removed_and_named():
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:4] = 0  # residual stream rows
        model.model.layers[1].mlp.up_proj.weight[:10] = 0  # gated MLP units: up zero is enough
    with pytest.warns(SparsityWarning, match="model.layers.0.mlp.down_proj"):
        small = shrink(model, IDS)
    assert small.model.layers[0].mlp.down_proj.out_features == 32
    assert small.model.layers[1].mlp.up_proj.out_features == 54
    torch.testing.assert_close(model(IDS).logits, small(IDS).logits, rtol=1e-4, atol=1e-5)
