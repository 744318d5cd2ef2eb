"""The transformers Trainer callback on a real tiny GPT-2 (random weights, CPU, a few steps)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import sparsetorch  # noqa: E402
from sparsetorch.errors import SparsityError  # noqa: E402
from sparsetorch.integrations import load_sparsifier_state  # noqa: E402
from sparsetorch.integrations.hf import STATE_FILE, SparsityCallback  # noqa: E402

from ddp_worker import SwapSparsifier  # noqa: E402

# GPT-2's projections are transformers' Conv1D, not nn.Linear, so they are named explicitly
GPT2_LAYERS = ["*.c_attn", "*.c_proj", "*.c_fc"]


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def trainer(tmp_path, model, sparsifier, steps=6, eval_dataset=None, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps, per_device_train_batch_size=4,
        learning_rate=5e-3, save_strategy="steps", save_steps=3, logging_strategy="no", disable_tqdm=True, seed=0,
        **kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=eval_dataset,
                                callbacks=[SparsityCallback(sparsifier)])


def swap():
    return SwapSparsifier(sparsity=0.7, every=2, include=GPT2_LAYERS, generator=torch.Generator().manual_seed(5))


def test_trainer_run_keeps_masks_and_sparsity(tmp_path):
    model, sparsifier = gpt2(), swap()
    trainer(tmp_path, model, sparsifier, gradient_accumulation_steps=2).train()
    assert sparsifier.step_count == 6  # once per optimizer step, not per micro-batch
    assert [row["step"] for row in sparsifier.history] == [0, 2, 4, 6]
    assert all(row["moved"] > 0 for row in sparsifier.history[1:])
    masked = list(sparsetorch.iter_masks(model))
    assert len(masked) == 8
    for item in masked:
        assert (item.param[~item.mask] == 0).all(), item.qualified_name
        assert (item.param[item.mask] != 0).float().mean() > 0.5  # kept weights were trained, not wiped
    assert sparsifier.density() == pytest.approx(0.3, abs=0.01)
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file() and (tmp_path / "checkpoint-6" / STATE_FILE).is_file()


def rigl():
    from sparsetorch import sparsifiers

    if not hasattr(sparsifiers, "RigL"):
        pytest.skip("RigL is not available")
    return sparsifiers.RigL(sparsity=0.7, every=2, include=GPT2_LAYERS, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("make", [swap, rigl], ids=["swap", "RigL"])
def test_trainer_resume_restores_masks_and_continues_the_run(tmp_path, make):
    ref_model, ref_sparsifier = gpt2(), make()
    trainer(tmp_path / "ref", ref_model, ref_sparsifier).train()

    first = gpt2()
    trainer(tmp_path / "run", first, make(), steps=6).train()  # saves checkpoint-3 on the way
    model, sparsifier = gpt2(seed=99), make()  # a new process: fresh model and sparsifier
    trainer(tmp_path / "run", model, sparsifier).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))

    assert sparsifier.step_count == 6 and sparsifier.history == ref_sparsifier.history
    for item, ref in zip(sparsetorch.iter_masks(model), sparsetorch.iter_masks(ref_model)):
        assert torch.equal(item.mask, ref.mask), item.qualified_name
        assert (item.param[~item.mask] == 0).all()
    for (name, value), ref in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(value, ref), name


def test_resume_without_sparsifier_state_is_an_error(tmp_path):
    trainer(tmp_path, gpt2(), swap(), steps=3).train()
    (tmp_path / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(SparsityError, match="masks would be lost"):
        trainer(tmp_path, gpt2(), swap()).train(resume_from_checkpoint=True)


def test_best_checkpoint_at_end_comes_with_its_masks(tmp_path):
    model, sparsifier = gpt2(), swap()
    # "best" = highest eval loss, i.e. the first checkpoint: its masks differ from the final ones
    t = trainer(tmp_path, model, sparsifier, eval_dataset=Tokens(), eval_strategy="steps", eval_steps=3,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    t.train()
    assert t.state.best_model_checkpoint.endswith("checkpoint-3")
    saved = load_sparsifier_state(tmp_path / "checkpoint-3" / STATE_FILE)
    final = load_sparsifier_state(tmp_path / "checkpoint-6" / STATE_FILE)
    assert any(not torch.equal(saved["masks"][k], final["masks"][k]) for k in saved["masks"])
    for item in sparsetorch.iter_masks(model):
        assert torch.equal(item.mask, saved["masks"][item.qualified_name]), item.qualified_name
        assert (item.param[~item.mask] == 0).all()


def test_sparsifier_attached_before_the_trainer(tmp_path):
    model, sparsifier = gpt2(), swap()
    sparsifier.attach(model)  # no optimizer yet: the callback hands it the Trainer's
    trainer(tmp_path, model, sparsifier, steps=4).train()
    assert sparsifier.optimizer is not None and sparsifier.step_count == 4
    for item in sparsetorch.iter_masks(model):
        assert (item.param[~item.mask] == 0).all()


@pytest.mark.parametrize("name", ["RigL", "GMP"])
def test_trainer_with_builtin_methods(tmp_path, name):
    from sparsetorch import sparsifiers

    if not hasattr(sparsifiers, name):
        pytest.skip(f"{name} is not available")
    g = torch.Generator().manual_seed(0)
    sparsifier = (sparsifiers.RigL(sparsity=0.7, every=2, include=GPT2_LAYERS, generator=g) if name == "RigL" else
                  sparsifiers.GMP(sparsity=0.7, start=0, end=4, every=2, include=GPT2_LAYERS, generator=g))
    model = gpt2()
    trainer(tmp_path, model, sparsifier, gradient_accumulation_steps=2).train()
    assert sparsifier.density() == pytest.approx(0.3, abs=0.01)
    if name == "RigL":
        assert sum(row["moved"] for row in sparsifier.history[1:]) > 0
    for item in sparsetorch.iter_masks(model):
        assert (item.param[~item.mask] == 0).all(), item.qualified_name
