"""Depth pruning (sparsetorch.shrink.remove_blocks): ShortGPT scores, block surgery, configs that reload."""
import copy

import pytest
import torch

from sparsetorch.errors import SparsityError
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.shrink import block_importance, remove_blocks
from sparsetorch.shrink.block_removal import block_influence


def _skipping(model, blocks, index):
    """A copy of ``model`` whose block ``index`` passes its input through: what removal must compute."""
    twin = copy.deepcopy(model)
    stack = dict(twin.named_modules())[blocks]

    def skip(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x
    stack[index].register_forward_hook(skip, with_kwargs=True)
    return twin


def _gpt_with_an_idle_block(idle=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=4, width=32, heads=2, context=16))
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 20))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):  # trained a little, so that skipping a working block raises the loss
        model.loss(torch.stack([text[i : i + 17] for i in range(step, step + 64, 8)])).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():  # no attention or MLP output: the block adds nothing to the residual stream
        model.blocks[idle].attn.proj.weight.zero_()
        model.blocks[idle].attn.proj.bias.zero_()
        model.blocks[idle].mlp.proj.weight.zero_()
        model.blocks[idle].mlp.proj.bias.zero_()
    calib = [text[None, i : i + 16] for i in range(0, 64, 16)]
    return model, calib


def test_block_influence_is_one_minus_cosine():
    x = torch.randn(2, 3, 8)
    assert block_influence(x, 2 * x, None)[0] == pytest.approx(0.0, abs=1e-5)
    s, n = block_influence(x, -x, torch.tensor([[True, False, True], [False, False, True]]))
    assert n == 3 and s == pytest.approx(6.0, abs=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "loss"])
def test_the_idle_block_scores_lowest_and_goes(metric):
    model, calib = _gpt_with_an_idle_block(2)
    scores = block_importance(model, calib, metric=metric)
    assert scores.shape == (4,) and int(scores.argmin()) == 2
    assert scores[2].abs() < 1e-5
    ids = torch.randint(0, 256, (2, 16))
    expected = model(ids)
    remove_blocks(model, 1, calib, metric=metric)
    assert len(model.blocks) == 3 and model.cfg.layers == 3
    assert model.sparsetorch_removed_blocks["removed"] == [2]
    torch.testing.assert_close(model(ids), expected)


def _hf_model(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval(), "transformer.h"
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval(), "model.layers"
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=8, max_window_layers=2)
    return transformers.Qwen2ForCausalLM(cfg).eval(), "model.layers"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_removed_blocks_reload_with_from_pretrained_and_decode_with_a_cache(tmp_path, arch):
    model, blocks = _hf_model(arch)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _skipping(model, blocks, 1)(ids).logits
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    remove_blocks(model, [1])
    n_layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
    assert n_layers == 3
    if layer_types:
        assert list(model.config.layer_types) == [layer_types[i] for i in (0, 2, 3)]
    torch.testing.assert_close(model(ids).logits, expected)
    model.save_pretrained(tmp_path / "small")
    loaded = type(model).from_pretrained(tmp_path / "small").eval()
    torch.testing.assert_close(loaded(ids).logits, expected)
    # greedy decoding with the KV cache (each attention's layer_idx renumbered) equals decoding without it
    with torch.no_grad():
        cached = loaded.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        seq = ids[:1]
        for _ in range(5):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_remove_blocks_by_fraction_keeps_the_most_important():
    model, calib = _gpt_with_an_idle_block(0)
    scores = block_importance(model, calib)
    remove_blocks(model, 0.5, calib)
    assert model.sparsetorch_removed_blocks["removed"] == sorted(torch.argsort(scores)[:2].tolist())
    assert len(model.blocks) == 2


def test_remove_blocks_bad_input():
    model, calib = _gpt_with_an_idle_block()
    with pytest.raises(SparsityError, match="at least one must stay"):
        remove_blocks(model, [0, 1, 2, 3])
    with pytest.raises(SparsityError, match=r"\[0, 4\)"):
        remove_blocks(model, [4])
    with pytest.raises(SparsityError, match=r"\[0, 1\)"):
        remove_blocks(model, 1.0, calib)
    with pytest.raises(SparsityError, match="needs calibration"):
        remove_blocks(model, 1)
    with pytest.raises(SparsityError, match="metric must be"):
        block_importance(model, calib, metric="magic")
    with pytest.raises(SparsityError, match="no stack of repeated blocks"):
        remove_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)), [0])
    assert len(model.blocks) == 4  # nothing half-done


def test_a_depth_pruned_student_distils_with_hidden_states_of_the_matching_teacher_blocks():
    from sparsetorch.recovery import DistillLoss, distill

    teacher, calib = _gpt_with_an_idle_block(1)
    with torch.no_grad():  # the removed block now matters, so there is something to win back
        teacher.blocks[1].mlp.proj.weight.normal_(0, 0.05)
    student = remove_blocks(copy.deepcopy(teacher), [1])
    data = torch.cat(calib + [c.roll(3, 1) for c in calib])
    result = distill(student, teacher, data, steps=20, batch_size=4, lr=3e-3, loss=DistillLoss(hidden=1.0),
                     generator=torch.Generator().manual_seed(0))
    hidden = [h["hidden"] for h in result.history]
    assert sum(hidden[-4:]) < sum(hidden[:4])
