"""Recovery after pruning (sparsetorch.recovery): distillation, the teacher cache, sparse LoRA merged through masks."""
import copy

import pytest
import torch

from sparsetorch.core.masks import get_mask, iter_masks
from sparsetorch.errors import SparsityError
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.oneshot import prune_oneshot
from sparsetorch.recovery import DistillLoss, TeacherCache, distill, logit_kl
from sparsetorch.recovery.loop import batch_rows

CFG = GPTConfig(layers=2, width=32, heads=2, context=16)


def _data(rows=48, seed=0):
    # a learnable byte stream: repeated phrases, so a few steps visibly lower the loss
    g = torch.Generator().manual_seed(seed)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 40))
    starts = torch.randint(0, text.numel() - 16, (rows,), generator=g)
    return torch.stack([text[s : s + 16] for s in starts.tolist()])


_TRAINED = {}


def _teacher(seed=0):
    """A GPT trained briefly on the repeated phrase (random weights give near-uniform outputs: nothing to distil)."""
    if seed not in _TRAINED:
        torch.manual_seed(seed)
        model = GPT(CFG)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = _data(64, seed=100)
        for step in range(40):
            model.loss(data[(step * 8) % 64 : (step * 8) % 64 + 8]).backward()
            opt.step()
            opt.zero_grad()
        _TRAINED[seed] = model.eval()
    return copy.deepcopy(_TRAINED[seed])


def _pair(pattern="unstructured", seed=0, method="sparsegpt", sparsity=0.5):
    teacher = _teacher(seed)
    data = _data()
    student = copy.deepcopy(teacher)
    prune_oneshot(student, [data[i : i + 1] for i in range(8)], method=method,
                  sparsity=None if ":" in pattern else sparsity, pattern=pattern, progress=False)
    return teacher, student, data


def _zeros_hold(model):
    for item in iter_masks(model):
        w = getattr(item.module, item.name)
        assert not w[~item.mask].any(), item.fqn


def test_logit_kl_is_hintons_t2_scaled_kl():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert logit_kl(t, t, 2.0).abs() < 1e-6
    p = torch.softmax(t / 2, -1)
    manual = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(logit_kl(s, t, 2.0), manual)
    with pytest.raises(SparsityError, match="shape"):
        logit_kl(s, t[..., :10])


def test_distill_lowers_the_loss_and_keeps_masks_exact():
    teacher, student, data = _pair(method="magnitude", sparsity=0.8)  # a real gap to close
    masks = {m.fqn: m.mask.clone() for m in iter_masks(student)}
    res = distill(student, teacher, data, steps=25, batch_size=8, lr=3e-3, loss=DistillLoss(temperature=2.0, task=0.1),
                  accumulate=2, autocast=torch.bfloat16, clip=0.5, generator=torch.Generator().manual_seed(1))
    first, last = res.history[0]["kl"], sum(h["kl"] for h in res.history[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert {m.fqn: m.mask for m in iter_masks(student)}.keys() == masks.keys()
    assert all(torch.equal(m.mask, masks[m.fqn]) for m in iter_masks(student))
    _zeros_hold(student)
    assert res.tokens == 25 * 2 * 8 * 16


def test_hidden_state_matching_and_plain_finetuning():
    teacher, student, data = _pair()
    res = distill(student, teacher, data, steps=3, loss=DistillLoss(kl=1, hidden=1))
    assert all("hidden" in h for h in res.history)
    ft = distill(student, None, data, steps=3, loss=DistillLoss(kl=0, task=1))
    assert set(ft.history[0]) >= {"task", "total"} and "kl" not in ft.history[0]
    _zeros_hold(student)


def test_cached_and_live_teacher_give_the_same_gradients(tmp_path):
    teacher, student, data = _pair()
    cache = TeacherCache.build(teacher, data, tmp_path / "cache", batch_size=5, chunk=7)
    rows = batch_rows(0, 0, len(data), 8, 1, 123)
    with torch.no_grad():
        live = teacher(data[rows])
    torch.testing.assert_close(cache.logits(rows), live, rtol=1e-5, atol=1e-5)
    grads = []
    for source in ({"teacher": teacher}, {"teacher": None, "teacher_cache": tmp_path / "cache"}):
        s = copy.deepcopy(student)
        opt = torch.optim.SGD([p for p in s.parameters()], lr=0.0)  # lr 0: the step leaves weights, we read grads
        captured = {}
        orig = opt.step
        opt.step = lambda: (captured.update({n: p.grad.clone() for n, p in s.named_parameters()}), orig())[1]
        distill(s, source.pop("teacher"), data, steps=1, optimizer=opt, clip=None, **source)
        grads.append(captured)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_teacher_cache_refuses_bad_folders(tmp_path):
    teacher, _, data = _pair()
    with pytest.raises(SparsityError, match="no finished"):
        TeacherCache(tmp_path)
    cache = TeacherCache.build(teacher, data, tmp_path / "c", chunk=16)
    with pytest.raises(SparsityError, match="other data"):
        cache.check_data(data[:-1])
    with pytest.raises(SparsityError, match="other data"):
        distill(copy.deepcopy(teacher), None, data.flip(0), steps=1, teacher_cache=tmp_path / "c")
    (tmp_path / "c" / cache.files[1]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(SparsityError, match="rebuild"):
        cache.logits(torch.tensor([20]))
    (tmp_path / "c" / cache.files[0]).unlink()
    with pytest.raises(SparsityError, match="missing"):
        TeacherCache(tmp_path / "c")


def test_resume_is_bitwise(tmp_path):
    teacher, student, data = _pair()
    straight = copy.deepcopy(student)
    distill(straight, teacher, data, steps=6, generator=torch.Generator().manual_seed(5), lr=1e-3)

    killed = copy.deepcopy(student)
    opt = torch.optim.AdamW([p for p in killed.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.0)
    calls, orig = [0], opt.step

    def dying_step():
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        orig()
    opt.step = dying_step
    with pytest.raises(KeyboardInterrupt):
        distill(killed, teacher, data, steps=6, optimizer=opt, generator=torch.Generator().manual_seed(5),
                checkpoint=tmp_path / "run", checkpoint_every=2)
    resumed = copy.deepcopy(student)
    res = distill(resumed, teacher, data, steps=6, generator=torch.Generator().manual_seed(99), lr=1e-3,
                  checkpoint=tmp_path / "run")
    assert [h["step"] for h in res.history] == list(range(6))
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_distill_bad_input():
    teacher, student, data = _pair()
    with pytest.raises(SparsityError, match="token ids"):
        distill(student, teacher, data.float(), steps=1)
    with pytest.raises(SparsityError, match="teacher"):
        distill(student, None, data, steps=1)
    with pytest.raises(SparsityError, match="positive"):
        distill(student, teacher, data, steps=0)
    with pytest.raises(SparsityError, match="weights"):
        DistillLoss(kl=0, task=0)


# -- sparse LoRA ---------------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
from sparsetorch.recovery import add_lora, merge_lora  # noqa: E402


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_lora_merge_keeps_masks_and_sparsity_exact(pattern):
    teacher, student, data = _pair(pattern)
    masks = {m.fqn: m.mask.clone() for m in iter_masks(student)}
    zeros = {n: int((p == 0).sum()) for n, p in student.named_parameters() if p.dim() == 2}
    model = add_lora(student, r=4)
    distill(model, teacher, data, steps=8, lr=1e-2)
    x = data[:4]
    with torch.no_grad():
        adapted = model(x)
    merged = merge_lora(model)
    assert type(merged) is GPT
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-4)  # masked adapters: merge is exact
    assert {m.fqn for m in iter_masks(merged)} == set(masks)
    for m in iter_masks(merged):
        assert torch.equal(m.mask, masks[m.fqn]), m.fqn
    after = {n: int((p == 0).sum()) for n, p in merged.named_parameters() if p.dim() == 2}
    assert after == zeros
    changed = sum(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), teacher.state_dict().values()))
    assert changed > 0
    if pattern == "2:4":
        for m in iter_masks(merged):
            assert (m.mask.view(m.mask.shape[0], -1, 4).sum(-1) == 2).all()


def test_lora_init_draws_from_the_generator_not_the_global_one():
    _, student, _ = _pair()

    def adapters(seed, global_seed):
        torch.manual_seed(global_seed)
        model = add_lora(copy.deepcopy(student), r=4, generator=torch.Generator().manual_seed(seed))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, again, other = adapters(0, global_seed=1), adapters(0, global_seed=2), adapters(1, global_seed=1)
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if "lora_A" in n)
    assert all(not p.any() for n, p in first.items() if "lora_B" in n)  # B = 0: starts equal to the base model


def test_unmasked_lora_merge_still_sparse_and_refuses_unknown_patterns():
    teacher, student, data = _pair()
    model = add_lora(student, r=4, masked=False)
    distill(model, teacher, data, steps=3, lr=1e-2)
    merged = merge_lora(model)
    _zeros_hold(merged)
    bare = GPT(CFG)
    with torch.no_grad():
        bare.blocks[0].mlp.fc.weight[:, :5] = 0
    wrapped = peft.get_peft_model(bare, peft.LoraConfig(r=2, target_modules=["blocks.0.mlp.fc"]))
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.fill_(0.1)
    with pytest.raises(SparsityError, match="no mask"):
        merge_lora(wrapped)
    assert get_mask(bare.blocks[0].mlp.fc) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_with_peft_keeps_the_pattern_through_merge(tmp_path, arch):
    """Trainer + PEFT + SparsityCallback() on a one-shot 2:4 model: after training and merge_lora the model
    is still exactly 2:4 with the same masks, and it loads with plain from_pretrained."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sparsetorch.integrations.hf import SparsityCallback

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=64)
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    prune_oneshot(model, [ids[i : i + 1] for i in range(4)], method="wanda", pattern="2:4", progress=False)
    masks = {m.fqn: m.mask.clone() for m in iter_masks(model)}
    wrapped = add_lora(model, r=4)
    ds = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=4,
                                          per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    transformers.Trainer(model=wrapped, args=args, train_dataset=ds, callbacks=[SparsityCallback()]).train()
    merged = merge_lora(wrapped)
    got = {m.fqn: m.mask for m in iter_masks(merged)}
    assert got.keys() == masks.keys() and all(torch.equal(got[k], masks[k]) for k in masks)
    for m in iter_masks(merged):
        w = getattr(m.module, m.name)
        assert not w[~m.mask].any()
        w2 = w if arch == "llama" else w.t()
        assert ((w2 != 0).view(w2.shape[0], -1, 4).sum(-1) <= 2).all()
    merged.save_pretrained(tmp_path / "out")
    plain = type(merged).from_pretrained(tmp_path / "out")
    for (n, a), b in zip(merged.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n


def test_callback_without_sparsifier_refuses_a_dense_model():
    from sparsetorch.integrations.hf import keep_masks
    with pytest.raises(SparsityError, match="no masks"):
        keep_masks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_distill_trains_compressed_sparse_linear_layers():
    """A student whose Linear layers only exist compressed (SparseLinear, nnz values) distils like a masked one."""
    from sparsetorch.sparse_training import to_sparse_training
    from sparsetorch.sparse_training.sparse_linear import SparseLinear

    teacher, data = _teacher(), _data()
    student = to_sparse_training(copy.deepcopy(teacher), sparsity=0.6, init="magnitude",
                                 generator=torch.Generator().manual_seed(0))
    layers = [m for m in student.modules() if isinstance(m, SparseLinear)]
    assert layers
    before = [(m.indptr.clone(), m.indices.clone()) for m in layers]
    result = distill(student, teacher, data, steps=25, batch_size=8, lr=3e-3, generator=torch.Generator().manual_seed(0))
    losses = [h["total"] for h in result.history]
    assert sum(losses[-5:]) < sum(losses[:5])
    for m, (indptr, indices) in zip(layers, before):  # the connectivity is the structure: it cannot move
        assert torch.equal(m.indptr, indptr) and torch.equal(m.indices, indices)


# -- the recipe: prune -> recover -> save, in one call and one command ------------------------------------------
@pytest.mark.parametrize("recovery,pattern", [("distill", "unstructured"), ("lora", "2:4"), ("finetune", "unstructured")])
def test_recover_recipe_prunes_recovers_and_saves(tmp_path, recovery, pattern):
    import sparsetorch
    from sparsetorch.recipes.prune_and_recover import recover

    teacher, data = _teacher(), _data(64)
    dense_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = recover(teacher, [data[i : i + 1] for i in range(8)], data, sparsity=None if ":" in pattern else 0.7,
                     pattern=pattern, recovery=recovery, steps=30, lr=1e-2 if recovery == "lora" else 3e-3,
                     generator=torch.Generator().manual_seed(0), progress=False, out=tmp_path / "m.safetensors")
    dense, pruned, final = report.stages
    assert pruned.loss > dense.loss and final.loss < pruned.loss  # pruning cost something; recovery won some back
    assert final.sparsity == pruned.sparsity == pytest.approx(0.5 if pattern == "2:4" else 0.7, abs=1e-3)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in dense_state.items())  # the teacher is untouched
    model = report.model
    _zeros_hold(model)
    if pattern == "2:4":
        for m in iter_masks(model):
            assert (m.mask.view(m.mask.shape[0], -1, 4).sum(-1) == 2).all()
    table = str(report)
    assert "vs dense" in table and recovery in table and "KiB" in table
    loaded = sparsetorch.load(GPT(CFG), tmp_path / "m.safetensors")
    assert torch.equal(loaded(data[:2]), model(data[:2]))
    assert report.to_dict()["stages"][2]["stage"] == recovery


def test_recover_recipe_bad_input():
    from sparsetorch.recipes.prune_and_recover import recover

    teacher, data = _teacher(), _data(16)
    with pytest.raises(SparsityError, match="recovery must be one of"):
        recover(teacher, [data[:1]], data, recovery="magic", progress=False)
    with pytest.raises(SparsityError, match="token ids"):
        recover(teacher, [data[:1]], torch.randn(4, 16), progress=False)


def test_recover_command_on_a_transformers_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparsetorch.cli.main import main

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=256, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    argv = ["recover", str(tmp_path / "tiny"), "--calibration", str(tmp_path / "text.txt"), "--out",
            str(tmp_path / "out"), "--pattern", "2:4", "--recovery", "lora", "--steps", "4", "--batch-size", "4",
            "--nsamples", "4", "--train-samples", "32", "--seqlen", "32", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "vs dense" in out and "lora" in out
    report = __import__("json").loads((tmp_path / "out" / "recover.json").read_text())
    assert report["stages"][1]["sparsity"] == report["stages"][2]["sparsity"] == 0.5
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    w = model.model.layers[0].mlp.up_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert main(argv[:-1] + ["--seqlen", "4096"]) == 2  # past the context: a clear error, exit 2
    assert "context" in capsys.readouterr().err
