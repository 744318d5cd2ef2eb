"""Packed grouped-query decode attention: sdpa's results without repeating the KV cache."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from sparsetorch.inference.gqa_attention import ATTENTION, packed_decode_attention, use_packed_decode_attention  # noqa: E402


class _Attn(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


@pytest.mark.parametrize("mask_heads", [None, 1, 8])
def test_packed_attention_equals_sdpa_for_one_query_token(mask_heads):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g),
               torch.randn(2, 2, 10, 16, generator=g))
    mask = None
    if mask_heads:  # a static cache: the last slots not filled yet, masked; per head when mask_heads = 8
        mask = torch.rand(2, mask_heads, 1, 10, generator=g) > 0.3
        mask[..., 0] = True
    got, _ = packed_decode_attention(_Attn(), q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, 1, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_decode_attention_traces_in_one_graph():
    """Inside a compiled decode step it must not break the graph: a break there leaves each layer's attention a
    frame of its own, recompiled per layer index until dynamo's limit, after which the step runs eager."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 8, 1, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g),
               torch.randn(1, 2, 12, 16, generator=g))
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., 9:] = False

    def step(q, k, v, mask):
        return packed_decode_attention(_Attn(), q, k, v, mask, scaling=0.25)[0]

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v, mask), step(q, k, v, mask))


def test_prompts_fall_back_to_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 8, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    got, _ = packed_decode_attention(_Attn(), q, k, v, None)
    torch.testing.assert_close(got, sdpa_attention_forward(_Attn(), q, k, v, None)[0])


def _llama(kv_heads: int, attn: str = "sdpa"):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=kv_heads, vocab_size=64, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_static_cache_generate_gives_sdpa_tokens(monkeypatch):
    """Static cache (what compile_decode sets up), run eagerly: the masks of its unfilled slots must come along,
    and every decode step's attention runs on the compiled kernel where it is built."""
    from sparsetorch.kernels import custom_ops, inference_ops

    calls = []
    real = custom_ops.decode_attention
    monkeypatch.setattr(custom_ops, "decode_attention", lambda *a: calls.append(a[3]) or real(*a))
    model = _llama(kv_heads=2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    model.generation_config.cache_implementation = "static"
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert use_packed_decode_attention(model) and model.config._attn_implementation == ATTENTION
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    if inference_ops.available():  # 2 layers x 11 decode steps, each with the static cache's slot mask
        assert len(calls) == 22 and all(keep is not None and keep.shape[0] == 2 for keep in calls)
        assert calls[0].sum(1).tolist() == [8, 8]  # first decode step: the 7 prompt slots and its own


def test_only_grouped_query_sdpa_models_switch():
    assert not use_packed_decode_attention(_llama(kv_heads=8))  # one query head per kv head: nothing repeated
    eager = _llama(kv_heads=2, attn="eager")
    assert not use_packed_decode_attention(eager) and eager.config._attn_implementation == "eager"
    assert not use_packed_decode_attention(torch.nn.Linear(2, 2))


def test_to_inference_switches_a_decoder_and_keeps_its_tokens():
    import sparsetorch

    model = _llama(kv_heads=2)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False)
        fast = sparsetorch.to_inference(model, (ids,), budget_s=0.005)
        got = fast.generate(ids, max_new_tokens=10, do_sample=False)
    assert fast.config._attn_implementation == ATTENTION and model.config._attn_implementation == "sdpa"
    assert torch.equal(got, want)
    eager = _llama(kv_heads=2, attn="eager")
    assert sparsetorch.to_inference(eager, (ids,), budget_s=0.005).config._attn_implementation == "eager"
