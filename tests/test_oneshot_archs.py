"""prune_oneshot on every architecture a user brings: tiny random transformers built from configs
(2 layers, hidden 64, nothing downloaded), decoders, encoders and mixtures of experts with fused 3-D experts."""
import pytest
import torch

from sparsetorch.core.masks import iter_masks
from sparsetorch.oneshot import prune_oneshot
from sparsetorch.oneshot.blocks import capture_block_calls, find_blocks, first_tensor
from sparsetorch.oneshot.calibration import prepare_calibration
from sparsetorch.oneshot.linear_layers import TokenMask

transformers = pytest.importorskip("transformers")
T = transformers
VOCAB = 256
DEC = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
ENC = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB,
           max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MIXED = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # layers called differently

# name -> (builder, number of layers a default run prunes: attention + MLP Linears + one per expert and fused param)
ARCHS = {
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                                    bos_token_id=0, eos_token_id=0)), 8),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                                 vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64,
                                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)), 12),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**DEC)), 14),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**DEC)), 14),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DEC, use_sliding_window=True, sliding_window=4,
                                                       layer_types=["full_attention", "sliding_attention"])), 14),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DEC, head_dim=16)), 14),
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**DEC)), 8),  # fused qkv_proj and gate_up_proj Linears
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**DEC, head_dim=16)), 14),  # embeddings scaled by sqrt(H)
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DEC, head_dim=16, **MIXED)), 14),
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DEC, head_dim=16, **MIXED)), 14),  # + local/global rope
    "bert": (lambda: T.BertModel(T.BertConfig(**ENC)), 12),  # pooler.dense (the last Linear) stays dense
    "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**ENC, pad_token_id=1)), 12),
    "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(**DEC, num_local_experts=4, num_experts_per_tok=2)), 24),
    "qwen2_moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**DEC, **MOE, num_experts=4,
                                                                 shared_expert_intermediate_size=64)), 30),
    "qwen3_moe": (lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**DEC, **MOE, num_experts=4, head_dim=16)), 24),
    "gpt_oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(  # experts stored transposed [E, in, out], with biases
        **{**DEC, "intermediate_size": 32}, head_dim=16, num_local_experts=4, num_experts_per_tok=2, **MIXED,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})), 24),
}
def _build(arch, seed=0):
    torch.manual_seed(seed)
    model = ARCHS[arch][0]().eval()
    if arch == "gpt_oss":  # its biases start at zero; give them values so that the bias path is exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "experts" in name and name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def _calib(arch, n=2, seq=16, seed=0):
    """Dicts of input_ids + attention_mask, the second row of each padded after 10 tokens."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if arch in ("opt", "roberta") else 0
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        ids[1, 10:], mask[1, 10:] = pad, 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# --- per-layer block arguments (fix: blocks were all replayed with block 0's mask and rotary tables) ----------------

@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2", "bert"])
def test_blocks_are_replayed_with_their_own_arguments(arch, one_thread):
    """Sliding-window and full-attention layers get different masks (Gemma 3 also different rotary tables):
    replaying the captured calls block by block reproduces the dense model exactly."""
    model = _build(arch)
    calib = prepare_calibration(model, _calib(arch))
    _, blocks = find_blocks(model)
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: outputs.append(first_tensor(out))) for b in blocks]
    with torch.no_grad():
        calib.run(calib.samples[1])
    for h in hooks:
        h.remove()
    calls = capture_block_calls(model, blocks, calib.run, calib.samples)
    hidden = calls[0][1].hidden
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = calls[i][1].run(block, hidden, torch.device("cpu"))
            assert torch.equal(hidden, outputs[i]), f"block {i}"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_sequential_statistics_of_later_blocks_match_one_pass(arch, monkeypatch, one_thread):
    """With only the last block pruned, block by block and one pass see the same dense inputs, so Wanda's masks agree
    exactly, which needs the last block run with its own attention mask (and Gemma 3's global rotary table)."""
    a, b = _build(arch), _build(arch)
    prune_oneshot(a, _calib(arch), method="wanda", sparsity=0.5, include="model.layers.1.*", progress=False)
    monkeypatch.setattr("sparsetorch.oneshot.api.find_blocks", lambda _model: None)
    prune_oneshot(b, _calib(arch), method="wanda", sparsity=0.5, include="model.layers.1.*", progress=False)
    assert (a.sparsetorch_stats.mode, b.sparsetorch_stats.mode) == ("sequential", "one-pass")
    reference = {m.fqn: m.mask for m in iter_masks(b)}
    for item in iter_masks(a):
        assert torch.equal(item.mask, reference[item.fqn]), item.fqn


# --- padding never enters the statistics (encoders; fix: flattened [batch * seq, H] inputs of MoE layers) ------------

@pytest.mark.parametrize("arch", ["bert", "qwen2_moe"])
def test_padded_calibration_gives_the_unpadded_masks(arch, one_thread):
    """BERT's blocks take the attention mask; an MoE block flattens tokens to [batch * seq, H] before its shared
    expert and experts. Padded positions must be dropped in both, so masks equal those of unpadded samples."""
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(2, VOCAB, (1, n), generator=g) for n in (9, 14, 20, 6)]
    plain = [{"input_ids": x} for x in ids]
    padded = [{"input_ids": torch.cat([x, torch.zeros(1, 24 - x.shape[1], dtype=torch.long)], 1),
               "attention_mask": torch.cat([torch.ones(1, x.shape[1]), torch.zeros(1, 24 - x.shape[1])], 1).long()}
              for x in ids]
    a, b = _build(arch), _build(arch)
    prune_oneshot(a, plain, method="wanda", sparsity=0.5, progress=False)
    prune_oneshot(b, padded, method="wanda", sparsity=0.5, progress=False)
    reference = {(m.fqn, m.name): m.mask for m in iter_masks(a)}
    masks = list(iter_masks(b))
    assert len(masks) == len(reference)
    for item in masks:
        assert torch.equal(item.mask, reference[item.fqn, item.name]), f"{item.fqn}.{item.name}"


def test_token_mask_selects_flattened_rows():
    tokens = TokenMask()
    tokens.current = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.arange(6.0)[:, None].repeat(1, 4)  # [batch * seq, features]
    assert tokens.select(x)[:, 0].tolist() == [0.0, 1.0, 3.0]
    assert tokens.select(x.reshape(2, 3, 4))[:, 0].tolist() == [0.0, 1.0, 3.0]
    assert tokens.select(x[:5]).shape == (5, 4)  # not the sample's tokens: kept whole
