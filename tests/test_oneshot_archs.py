"""prune_oneshot on every architecture a user brings: tiny random transformers built from configs
(2 layers, hidden 64, nothing downloaded), decoders, encoders and mixtures of experts with fused 3-D experts."""
import warnings

import pytest
import torch
from torch import nn

from sparsetorch import SparsityError, SparsityWarning
from sparsetorch.core.masks import get_mask, iter_masks
from sparsetorch.core.patterns import is_valid_mask, parse_pattern
from sparsetorch.oneshot import magnitude_mask, prune_oneshot
from sparsetorch.oneshot.blocks import capture_block_calls, find_blocks, first_tensor
from sparsetorch.oneshot.calibration import prepare_calibration
from sparsetorch.oneshot.experts import ExpertSlice, attach_layer_stats, fused_experts
from sparsetorch.oneshot.linear_layers import TokenMask, weight_2d

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
ROUTERS = (".gate", ".router", ".shared_expert_gate")  # name endings


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


def _output(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _masked_view(model, name):
    """The [out, in] keep-mask and weight of a pruned layer named as in the results."""
    if name.endswith("]"):
        owner_name, rest = name.rsplit(".", 1)
        param, index = rest[:-1].split("[")
        owner = model.get_submodule(owner_name)
        mask, weight = get_mask(owner, param)[int(index)], getattr(owner, param)[int(index)]
        transposed = fused_experts(owner).transposed
        return (mask.t(), weight.t()) if transposed else (mask, weight)
    module = model.get_submodule(name)
    mask = get_mask(module)
    return (mask if isinstance(module, nn.Linear) else mask.t()), weight_2d(module)


def _check_pruned(model, stats, pattern, layers):
    assert len(stats.layers) == layers
    for r in stats.layers:
        assert not any(k in r.name for k in ("lm_head", "embed", "wte", "wpe", "pooler")), r.name
        assert not r.name.endswith(ROUTERS), r.name
        mask, weight = _masked_view(model, r.name)
        assert mask.shape == weight.shape
        if pattern == "unstructured":
            assert int((~mask).sum()) == round(0.5 * mask.numel()), r.name  # exact count
        else:
            assert is_valid_mask(mask, pattern), r.name
        assert torch.all(weight[~mask] == 0), r.name
    masked = {(i.fqn, i.name) for i in iter_masks(model)}
    expected = {(r.name.rsplit(".", 1)[0], r.name.rsplit(".", 1)[1].split("[")[0]) if r.name.endswith("]")
                else (r.name, "weight") for r in stats.layers}
    assert masked == expected  # nothing else (head, embeddings, routers, norms) carries a mask


def _train_step(model, batch):
    """One AdamW step on a loss through every layer; pruned weights must stay exactly zero."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _output(model, batch).float().square().mean().backward()
    for item in iter_masks(model):
        assert item.param.grad is None or torch.all(item.param.grad[~item.mask] == 0), item.fqn
    before = {i.fqn + i.name: i.param.detach().clone() for i in iter_masks(model)}
    opt.step()
    for item in iter_masks(model):
        assert torch.all(item.param[~item.mask] == 0), f"{item.fqn}.{item.name}"
    assert any(not torch.equal(before[i.fqn + i.name], i.param) for i in iter_masks(model))  # it did train


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("wanda", "2:4"), ("sparsegpt", "2:4")])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_prunes_block_by_block(arch, method, pattern, one_thread):
    model = _build(arch)
    calib = _calib(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityWarning)  # no layer left outside the blocks, no expert without data
        prune_oneshot(model, calib, method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None,
                      progress=False)
    stats = model.sparsetorch_stats
    assert stats.mode == "sequential" and stats.blocks == 2 and stats.unrouted == []
    _check_pruned(model, stats, pattern, ARCHS[arch][1])
    with torch.no_grad():
        assert torch.isfinite(_output(model, calib[0])).all()
    _train_step(model, calib[0])


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


# --- mixture of experts ---------------------------------------------------------------------------------------------

def _never_route(router, expert):
    """A forward hook making ``router`` (a TopKRouter: logits, top-k weights, top-k indices) never pick ``expert``."""
    def hook(module, _args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        probs = logits.float().softmax(-1)
        weights, index = probs.topk(module.top_k, dim=-1)
        return logits, (weights / weights.sum(-1, keepdim=True)).to(out[1].dtype), index
    return router.register_forward_hook(hook)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_expert_without_tokens_is_pruned_by_magnitude_and_reported(method, one_thread):
    model = _build("mixtral")
    experts = model.model.layers[0].mlp.experts
    dense_up, dense_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    handle = _never_route(model.model.layers[0].mlp.gate, 3)
    with pytest.warns(SparsityWarning, match="received no token"):
        prune_oneshot(model, _calib("mixtral"), method=method, sparsity=0.5, progress=False)
    stats = model.sparsetorch_stats
    names = ["model.layers.0.mlp.experts.gate_up_proj[3]", "model.layers.0.mlp.experts.down_proj[3]"]
    assert stats.unrouted == names and stats.mode == "sequential"
    notes = {r.name: r.note for r in stats.layers}
    assert all(notes[n] == "no calibration tokens: pruned by magnitude" for n in names)
    assert sum(bool(n) for n in notes.values()) == 2
    pat = parse_pattern("unstructured")
    for param, dense in (("gate_up_proj", dense_up), ("down_proj", dense_down)):
        mask = get_mask(experts, param)
        assert torch.equal(mask[3], magnitude_mask(dense[3], 0.5, pat))  # by magnitude, weights not updated
        assert torch.equal(getattr(experts, param)[3], dense[3] * mask[3])
        for e in range(4):
            assert int((~mask[e]).sum()) == mask[e].numel() // 2  # every expert slice at exactly 50%
    if method == "sparsegpt":  # routed experts got OBS weight updates
        assert not torch.equal(experts.gate_up_proj[0], dense_up[0] * get_mask(experts, "gate_up_proj")[0])
    _train_step(model, _calib("mixtral")[0])
    handle.remove()
    with torch.no_grad():
        assert torch.isfinite(_output(model, _calib("mixtral")[0])).all()


def test_expert_statistics_come_from_exactly_the_routed_real_tokens(one_thread):
    """gate_up_proj[e] sees the real tokens routed to e; down_proj[e] sees act(gate) * up of them, checked against
    what transformers' eager experts forward actually feeds ``F.linear`` with down_proj[e]."""
    model = _build("mixtral")
    model.set_experts_implementation("eager")
    experts = model.model.layers[0].mlp.experts
    batch = _calib("mixtral")[0]
    real = batch["attention_mask"].bool()
    slices = {f"{p}[{e}]": ExpertSlice(fused_experts(experts), p, e) for p in ("gate_up_proj", "down_proj") for e in range(4)}
    tokens = TokenMask()
    tokens.current = real
    stats, handles = attach_layer_stats(slices, torch.device("cpu"), True, tokens)
    seen, routed = {e: [] for e in range(4)}, []
    linear = torch.nn.functional.linear

    def spy(x, w, *args, **kwargs):  # the eager forward's down projection of expert e, on every routed token
        for e in range(4):
            if w.data_ptr() == experts.down_proj[e].data_ptr() and w.shape == experts.down_proj.shape[1:]:
                seen[e].append(x.detach().clone())
        return linear(x, w, *args, **kwargs)

    handles.append(model.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: routed.append(out[2])))
    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        torch.nn.functional.linear = linear
        for h in handles:
            h.remove()
    index = routed[0]  # [tokens, k]
    for e in range(4):
        routed_e = (index == e).any(-1)
        _, token = torch.where((index == e).T)  # the eager loop's order: by top-k slot, then token
        down = torch.cat(seen[e])[real.reshape(-1)[token]]  # the real ones among the tokens routed to e
        assert stats[f"gate_up_proj[{e}]"].count == int((routed_e & real.reshape(-1)).sum()) > 0
        assert stats[f"down_proj[{e}]"].count == down.shape[0]
        assert torch.allclose(stats[f"down_proj[{e}]"].xtx, down.T @ down, atol=1e-5, rtol=1e-4)
    assert sum(stats[f"gate_up_proj[{e}]"].count for e in range(4)) == 2 * int(real.sum())  # top-2 routing


def test_include_exclude_and_sparsity_dicts_select_experts(one_thread):
    calib = _calib("qwen2_moe")
    model = _build("qwen2_moe")
    prune_oneshot(model, calib, method="wanda", sparsity=0.5, exclude="*experts*", progress=False)
    names = [r.name for r in model.sparsetorch_stats.layers]
    assert len(names) == 14 and not any("[" in n for n in names)  # attention + shared expert only
    assert get_mask(model.model.layers[0].mlp.experts, "gate_up_proj") is None
    model = _build("qwen2_moe")
    prune_oneshot(model, calib, method="wanda", sparsity={"*down_proj[[]0]": 0.75, "*": 0.5},
                  include=["*.mlp.experts"], progress=False)
    results = {r.name: r for r in model.sparsetorch_stats.layers}
    assert len(results) == 16 and all("experts" in n and "shared" not in n for n in results)
    assert results["model.layers.1.mlp.experts.down_proj[0]"].sparsity == pytest.approx(0.75)
    assert results["model.layers.1.mlp.experts.down_proj[1]"].sparsity == pytest.approx(0.5)
    model = _build("mixtral")
    prune_oneshot(model, _calib("mixtral"), method="magnitude", sparsity=0.5,
                  exclude=[T.models.mixtral.modeling_mixtral.MixtralExperts], progress=False)
    assert len(model.sparsetorch_stats.layers) == 8  # excluded by the experts module's type


@pytest.mark.parametrize("method,distribution", [("magnitude", "uniform"), ("wanda", "owl")])
def test_magnitude_and_owl_prune_experts(method, distribution, one_thread):
    """Weights-only runs install expert masks too; OWL spreads sparsity over blocks that include their experts."""
    model = _build("qwen3_moe")
    prune_oneshot(model, _calib("qwen3_moe"), method=method, sparsity=0.5, distribution=distribution, progress=False)
    stats = model.sparsetorch_stats
    assert len(stats.layers) == 24 and stats.sparsity == pytest.approx(0.5, abs=2e-3)
    for r in stats.layers:
        mask, _ = _masked_view(model, r.name)
        assert int((~mask).sum()) == round(r.target * mask.numel()), r.name
    if distribution == "owl":
        assert len(stats.outlier_ratios) == 2 and len({round(r.target, 9) for r in stats.layers}) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_moe_pruned_on_cuda_from_a_cpu_model(arch):
    """Blocks move to CUDA one at a time and back: expert slices follow their parameters; same result as on CPU."""
    model, reference = _build(arch), _build(arch)
    kwargs = dict(method="sparsegpt", pattern="2:4", sparsity=None, progress=False)
    prune_oneshot(model, _calib(arch), device="cuda", **kwargs)
    prune_oneshot(reference, _calib(arch), device="cpu", **kwargs)
    assert model.sparsetorch_stats.mode == "sequential"
    masks = {(i.fqn, i.name): i.mask for i in iter_masks(reference)}
    for item in iter_masks(model):
        assert item.mask.device.type == "cpu" and item.param.device.type == "cpu"
        agree = (item.mask == masks[item.fqn, item.name]).float().mean().item()
        assert agree > 0.97, f"{item.fqn}.{item.name}"  # float32 CUDA vs CPU math may flip near-ties
    with torch.no_grad():
        assert torch.isfinite(_output(model, _calib(arch)[0])).all()


def test_unknown_moe_layout_fails_clearly_and_can_be_excluded():
    llama4 = T.models.llama4.modeling_llama4
    cfg = T.Llama4TextConfig(hidden_size=64, intermediate_size=32, num_local_experts=4)
    with pytest.raises(SparsityError, match="Llama4TextExperts.*not understood.*top_k_index"):
        fused_experts(llama4.Llama4TextExperts(cfg))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.experts = llama4.Llama4TextExperts(cfg)
            self.out = nn.Linear(64, 4)

        def forward(self, x):
            return self.out(self.fc(x))

    x = [torch.randn(8, 64)]
    with pytest.raises(SparsityError, match=r"experts \(Llama4TextExperts\).*exclude=\['experts\*'\]"):
        prune_oneshot(Net(), x, method="wanda")
    net = prune_oneshot(Net(), x, method="wanda", exclude="experts*", progress=False)
    assert [r.name for r in net.sparsetorch_stats.layers] == ["fc"]
    net = prune_oneshot(Net(), x, method="wanda", include="fc", progress=False)  # not asked for: no error
    assert [r.name for r in net.sparsetorch_stats.layers] == ["fc"]


class _ExpertMLP(nn.Module):
    def __init__(self, h=32):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(h, 64, bias=False), nn.Linear(h, 64, bias=False), nn.Linear(64, h, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _OldMoeBlock(nn.Module):
    """transformers 4.x Mixtral-style: a Linear router and a ModuleList of per-expert Linear MLPs."""

    def __init__(self, h=32, experts=4):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.mix = nn.Linear(h, h)
        self.gate = nn.Linear(h, experts, bias=False)
        self.experts = nn.ModuleList(_ExpertMLP(h) for _ in range(experts))

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.gate(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(index == e)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return x + out.reshape(x.shape)


class _OldMoe(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList(_OldMoeBlock() for _ in range(2))
        self.lm_head = nn.Linear(32, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_per_expert_linear_moe_uses_the_normal_path_with_dense_routers(one_thread):
    """Older layouts: experts are Linears (pruned as usual, one without tokens by magnitude), the router stays
    dense, and the decoder blocks (not a layer's longer expert list) are the repeated blocks (fix)."""
    torch.manual_seed(0)
    model = _OldMoe().eval()
    assert find_blocks(model)[0] == "blocks"
    def never_3(_module, _args, logits):  # the router of block 0 never picks expert 3
        return logits.masked_fill(torch.arange(4) == 3, float("-inf"))

    model.blocks[0].gate.register_forward_hook(never_3)
    calib = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    with pytest.warns(SparsityWarning, match="received no token"):
        prune_oneshot(model, calib, method="sparsegpt", pattern="2:4", sparsity=None, progress=False)
    stats = model.sparsetorch_stats
    assert stats.mode == "sequential"
    names = {r.name for r in stats.layers}
    assert len(names) == 2 * (1 + 4 * 3) and not any("gate" in n or "lm_head" in n for n in names)
    assert {"blocks.0.experts.3.w1", "blocks.0.experts.3.w3", "blocks.0.experts.3.w2"} <= set(stats.unrouted)
    assert get_mask(model.blocks[0].gate) is None
    model.train()
    model(calib[0]).square().mean().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert all(torch.all(i.param[~i.mask] == 0) for i in iter_masks(model))
