"""Width and expert pruning of transformers decoders (sparsetorch.shrink.remove_heads / remove_mlp_channels /
remove_hidden / remove_experts): zero-importance units go without changing the outputs, every uniform case
reloads with plain transformers, per-block widths with sparsetorch's loader, and bad requests fail first."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsetorch.errors import SparsityError  # noqa: E402
from sparsetorch.shrink import (from_pretrained, remove_experts, remove_heads, remove_hidden,  # noqa: E402
                                remove_mlp_channels, save_pretrained, width_importance)
from sparsetorch.shrink.hf_folders import LOADER, PLAIN  # noqa: E402
from sparsetorch.shrink.width_scores import reap_saliency  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = [IDS]


def llama(**kw):
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-12)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def reloads(model, tmp_path, plain=True):
    """save_pretrained -> the expected loader gives the same logits; a non-plain folder is refused by transformers."""
    folder = save_pretrained(model, tmp_path / "small")
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert cfg.sparsetorch_shrink["loader"] == (PLAIN if plain else LOADER)
    if plain:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        with pytest.raises(RuntimeError, match="mismatch"):
            transformers.AutoModelForCausalLM.from_pretrained(folder)
        loaded = from_pretrained(folder)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    return loaded


def test_llama_zero_kv_group_goes_and_reloads_with_plain_transformers(tmp_path):
    model = llama()
    with torch.no_grad():  # group 1's values are zero in both blocks: its two query heads output nothing
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:16] = 0
    expected = logits(model)
    scores = width_importance(model, CALIB)
    assert all(float(h[2:].abs().max()) == 0 and float(h[:2].min()) > 0 for h in scores.heads)
    remove_heads(model, 0.5, CALIB)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 8, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 8)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)
    reloads(model, tmp_path)


def test_llama_query_heads_within_groups(tmp_path):
    model = llama()
    with torch.no_grad():  # query heads 1 and 2 (one per group) write nothing through o_proj
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 8:24] = 0
    expected = logits(model)
    scores = width_importance(model, CALIB)
    for h in scores.heads:
        h[1] = h[2] = 0.0  # their outputs are not zero (shared values), but what they add is: rank them last
    remove_heads(model, 0.5, unit="query", scores=scores)
    assert model.model.layers[1].self_attn.k_proj.out_features == 16  # every key/value head stays
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert model.sparsetorch_width_removed[-1]["removed"] == [[1, 2], [1, 2]]
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)
    loaded = reloads(model, tmp_path)
    with torch.no_grad():  # the KV cache holds both key/value heads for the one query head left in each group
        cached = loaded.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=4, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        seq = IDS[:1]
        for _ in range(4):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_llama_zero_mlp_neurons_and_hidden_channels_go(tmp_path):
    model = llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:12] = 0  # act(gate) * 0: these neurons are zero
            layer.self_attn.o_proj.weight[:8] = 0  # hidden channels 0..7: zero in every write to the stream
            layer.mlp.down_proj.weight[:8] = 0
        model.model.embed_tokens.weight[:, :8] = 0
    expected = logits(model)
    remove_mlp_channels(model, 0.25, CALIB)
    assert model.config.intermediate_size == 36 and model.model.layers[0].mlp.down_proj.in_features == 36
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)
    remove_hidden(model, 0.25, CALIB)
    assert model.sparsetorch_width_removed[-1]["removed"] == list(range(8))
    assert model.config.hidden_size == 24 and model.lm_head.in_features == 24
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)  # RMSNorm over 24 channels, rescaled
    reloads(model, tmp_path)


def test_flap_compensation_folds_a_constant_neuron_exactly():
    model = gpt2()
    with torch.no_grad():  # units 0..31: zero input weights, a bias: a constant activation gelu(b)
        for block in model.transformer.h:
            block.mlp.c_fc.weight[:, :32] = 0
            block.mlp.c_fc.bias[:32] = 0.5
    expected = logits(model)
    scores = width_importance(model, CALIB)
    for s in scores.mlp:
        s[:32] = 0  # large but constant: FLAP's case (its fluctuation metric would rank them last)
    plain = remove_mlp_channels(copy.deepcopy(model), 32, scores=scores)
    assert (logits(plain) - expected).abs().max() > 1e-3
    remove_mlp_channels(model, 32, scores=scores, compensate=True)
    assert model.sparsetorch_width_removed[-1]["removed"] == [list(range(32))] * 2
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_llama_compensation_declares_the_new_biases_in_the_config(tmp_path):
    model = llama()
    remove_mlp_channels(model, 0.5, CALIB, compensate=True)
    remove_heads(model, 0.5, CALIB, compensate=True)
    assert model.config.mlp_bias and model.config.attention_bias
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert mlp.down_proj.bias.abs().sum() > 0 and mlp.up_proj.bias.abs().sum() == 0
    assert attn.o_proj.bias.abs().sum() > 0 and attn.q_proj.bias.abs().sum() == 0
    reloads(model, tmp_path)


def test_gpt2_mlp_reloads_plainly_heads_and_hidden_with_the_loader(tmp_path):
    model = gpt2()
    with torch.no_grad():  # head 1 of each block: zero values -> zero output
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, 64 + 8: 64 + 16] = 0
            block.attn.c_attn.bias[64 + 8: 64 + 16] = 0
            block.mlp.c_fc.weight[:, :32] = 0
            block.mlp.c_fc.bias[:32] = 0
    expected = logits(model)
    remove_mlp_channels(model, 0.25, CALIB)
    assert model.config.n_inner == 96
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    reloads(model, tmp_path / "mlp")
    remove_heads(model, 1, CALIB)
    assert model.transformer.h[0].attn.num_heads == 3 and model.config.n_head == 4  # the config cannot say it
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    remove_hidden(model, 0.25, CALIB)  # LayerNorm re-centres: approximate, so only the shapes and reload are checked
    assert model.transformer.wte.weight.shape == (64, 24) and model.lm_head.weight is model.transformer.wte.weight
    loaded = reloads(model, tmp_path / "all", plain=False)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_per_layer_widths_use_the_loader(tmp_path):
    model = llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:30] = 0  # block 0's neurons are the weakest
    remove_mlp_channels(model, 0.5, CALIB, per_layer=True)
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert sum(widths) == 48 and widths[0] < widths[1] and model.config.intermediate_size == 48
    remove_heads(model, 0.5, CALIB, per_layer=True, unit="query")  # 2 of the 4 query heads, wherever they are weakest
    assert sum(layer.self_attn.q_proj.out_features for layer in model.model.layers) == 32
    reloads(model, tmp_path, plain=False)


def test_depth_then_width_reloads_with_plain_transformers(tmp_path):
    from sparsetorch.shrink import remove_blocks

    model = llama(num_hidden_layers=3)
    remove_blocks(model, 1, CALIB)
    remove_mlp_channels(model, 0.25, CALIB)
    remove_heads(model, 0.5, CALIB)
    assert (model.config.num_hidden_layers, model.config.intermediate_size, model.config.num_key_value_heads) == (2, 36, 1)
    reloads(model, tmp_path)


def _moe(kind, experts=16, top_k=1):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, num_experts_per_tok=top_k)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=experts, **common)
    elif kind == "qwen2":  # a shared expert and its sigmoid gate next to the routed ones
        cfg = transformers.Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                                          norm_topk_prob=True, **common)
    else:
        cfg = transformers.Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=24, head_dim=8, norm_topk_prob=True,
                                          **common)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_unrouted_experts_score_zero_and_go_without_changing_outputs(tmp_path):
    model = _moe("mixtral")
    calib = [IDS[:1, :5]]  # 5 tokens, top-1: at most 5 of 16 experts per block see a token
    saliency = width_importance(model, calib).experts
    assert all(int((s > 0).sum()) <= 5 for s in saliency)
    with torch.no_grad():
        expected = model(calib[0]).logits
    remove_experts(model, 0.5, calib)
    assert model.config.num_local_experts == 8 and model.model.layers[0].mlp.gate.weight.shape == (8, 32)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    with torch.no_grad():
        torch.testing.assert_close(model(calib[0]).logits, expected, rtol=1e-5, atol=1e-6)
    reloads(model, tmp_path)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_expert_pruning_caps_top_k_and_reloads(tmp_path, kind):
    model = _moe(kind, experts=8, top_k=4)
    remove_experts(model, 6, CALIB)
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 2
    assert model.model.layers[0].mlp.gate.top_k == 2
    reloads(model, tmp_path)
    hidden = _moe(kind, experts=8, top_k=2)  # hidden size through routers, fused and shared experts
    remove_hidden(hidden, 0.25, CALIB)
    assert hidden.model.layers[0].mlp.experts.down_proj.shape == (8, 24, 24)
    reloads(hidden, tmp_path / "hidden")


def test_reap_saliency_is_gate_times_output_norm():
    out = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(reap_saliency(torch.tensor([0.5, 2.0]), out)) == pytest.approx(0.5 * 5 + 2.0 * 1)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("call, match", [
    (lambda m: remove_heads(m, 0.3, CALIB), r"not a whole number.*0\.5"),
    (lambda m: remove_heads(m, 1.0, CALIB), r"\[0, 1\)"),
    (lambda m: remove_heads(m, -0.1, CALIB), r"\[0, 1\)"),
    (lambda m: remove_heads(m, 2, CALIB), "at least one must stay"),
    (lambda m: remove_heads(m, 1, CALIB, unit="query"), "multiple of 2"),
    (lambda m: remove_heads(m, 4, CALIB, unit="query"), "at least one must stay"),
    (lambda m: remove_heads(m, 0.5, CALIB, unit="heads"), "unit must be"),
    (lambda m: remove_heads(m, 0.5), "calibration"),
    (lambda m: remove_mlp_channels(m, 1.5, CALIB), r"\[0, 1\)"),
    (lambda m: remove_mlp_channels(m, 48, CALIB), "at least one must stay"),
    (lambda m: remove_hidden(m, True, CALIB), "count or a fraction"),
    (lambda m: remove_experts(m, 0.5, CALIB), "no mixture-of-experts"),
    (lambda m: remove_mlp_channels(m, 0.5, scores=width_importance(llama(intermediate_size=32), CALIB)),
     "do not match"),
])
def test_bad_requests_fail_before_anything_changes(call, match):
    model = llama()
    before = _state(model)
    with pytest.raises(SparsityError, match=match):
        call(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gqa_shapes_that_no_config_can_express_are_refused():
    mqa = llama(num_key_value_heads=1)
    with pytest.raises(SparsityError, match="multi-query.*unit='query'"):
        remove_heads(mqa, 0.5, CALIB)  # the only key/value group
    remove_heads(mqa, 0.5, CALIB, unit="query")  # MQA: query heads go instead
    assert (mqa.config.num_attention_heads, mqa.config.num_key_value_heads) == (2, 1)
    with pytest.raises(SparsityError, match="unit='group'"):
        remove_heads(gpt2(), 0.5, CALIB, unit="query")  # one query head per group: nothing to choose within
    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).eval()
    before = _state(qwen2)
    with pytest.raises(SparsityError, match="compensate=False"):
        remove_heads(qwen2, 0.5, CALIB, compensate=True)  # o_proj has no bias and the config cannot declare one
    assert all(torch.equal(before[k], v) for k, v in qwen2.state_dict().items())


def test_from_pretrained_refuses_a_tampered_entry(tmp_path):
    model = llama()
    remove_mlp_channels(model, 0.5, CALIB, per_layer=True)
    folder = save_pretrained(model, tmp_path / "small")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"in_features"', '"__class__"', 1))
    with pytest.raises(SparsityError, match="__class__"):
        from_pretrained(folder)


def test_a_hidden_pruned_student_distils_against_the_teacher_channels_it_kept():
    from sparsetorch.recovery import DistillLoss, distill

    teacher = llama()
    with torch.no_grad():  # channels 3, 9, 17, 30 carry nothing: the student starts exactly on the teacher's stream
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[[3, 9, 17, 30]] = 0
            layer.mlp.down_proj.weight[[3, 9, 17, 30]] = 0
        teacher.model.embed_tokens.weight[:, [3, 9, 17, 30]] = 0
    student = remove_hidden(copy.deepcopy(teacher), 4, CALIB)
    assert student.sparsetorch_width_removed[-1]["removed"] == [3, 9, 17, 30]
    data = torch.cat([IDS, IDS.roll(3, 1)])
    result = distill(student, teacher, data, steps=1, batch_size=4, lr=1e-4, loss=DistillLoss(hidden=1.0))
    assert result.history[0]["hidden"] < 1e-8
