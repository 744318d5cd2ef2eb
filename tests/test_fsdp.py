"""Sparse training under FSDP2 (fully_shard) on two gloo processes (torchrun, CPU).

After every step, FSDP2's gathered masks must equal the DDP run's and a single process's on the whole
batch exactly, and its weights within float tolerance (the reduce-scatter averages the two half-batch
gradients where the single process takes one full-batch gradient). A checkpoint saved with
torch.distributed.checkpoint by the 2 ranks resumes bitwise on 2 ranks and loads on 1 process.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsetorch

import fsdp_worker
from test_ddp import torchrun

STEPS = 6
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSDP_TEST_COMPILE": "1"}
    cmd = [*torchrun(), "--standalone", "--nproc_per_node=2", str(Path(fsdp_worker.__file__)), str(out), str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, reports, load_file(out / "fsdp.safetensors")


def steps_of(tensors: dict, prefix: str) -> list[dict]:
    return [{k[len(f"{prefix}/{i}/"):]: v for k, v in tensors.items() if k.startswith(f"{prefix}/{i}/")}
            for i in range(STEPS + 1)]


def assert_same_run(got: list[dict], want: list[dict], what: str) -> None:
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys() and a, f"{what}, step {step}"
        for name in a:
            if name.endswith("_mask"):
                assert torch.equal(a[name], b[name]), f"{what}: mask {name} differs after step {step}"
            else:
                torch.testing.assert_close(a[name], b[name], **TOL, msg=f"{what}: {name} after step {step}")
            if name.endswith("_mask"):
                assert not a[name[: -len("_mask")]][~a[name]].any(), f"{what}: pruned weight nonzero, step {step}"


@pytest.mark.parametrize("method", fsdp_worker.METHODS)
def test_fsdp_equals_ddp_and_a_single_process_after_every_step(ranks, method):
    _, reports, tensors = ranks
    _, single, snaps = fsdp_worker.run_method(method, STEPS, 0, 1, "none")
    fsdp, ddp = steps_of(tensors, f"fsdp/{method}"), steps_of(tensors, f"ddp/{method}")
    assert_same_run(fsdp, snaps, f"{method}: FSDP2 vs one process")
    assert_same_run(fsdp, ddp, f"{method}: FSDP2 vs DDP")
    assert reports[0][f"fsdp/{method}"] == reports[1][f"fsdp/{method}"] == single.history
    if method != "Static":  # the masks did move, so equality is not vacuous
        assert any(row["moved"] > 0 for row in single.history[1:])


@pytest.mark.parametrize("variant", list(fsdp_worker.PATTERNS))
def test_gmp_patterns_under_fsdp(ranks, variant):
    _, _, tensors = ranks
    _, single, snaps = fsdp_worker.run_method(variant, STEPS, 0, 1, "none")
    assert any(row["moved"] > 0 for row in single.history[1:])
    assert_same_run(steps_of(tensors, f"fsdp/{variant}"), snaps, f"{variant}: FSDP2 vs one process")


def test_rigl_with_adamw_state_sharded(ranks):
    """AdamW's moments are DTensors under FSDP2: zeroed on their shards when masks move."""
    _, _, tensors = ranks
    _, _, snaps = fsdp_worker.run_method("RigL", STEPS, 0, 1, "none", "adamw")
    assert_same_run(steps_of(tensors, "fsdp/RigL_adamw"), snaps, "RigL + AdamW: FSDP2 vs one process")


def test_rigl_gradient_accumulation_under_fsdp(ranks):
    """Two micro-batches per step: FSDP2 reduce-scatters and accumulates after each, and the mask hook zeroes
    pruned entries in between; RigL's captured dense gradient is still the sum (the single process's)."""
    _, _, tensors = ranks
    _, single, snaps = fsdp_worker.run_method("RigL", STEPS, 0, 1, "none", micro=2, emulate=2)
    assert any(row["moved"] > 0 for row in single.history[1:])
    assert_same_run(steps_of(tensors, "fsdp/RigL_micro"), snaps, "RigL, 2 micro-batches: FSDP2 vs one process")


@pytest.mark.parametrize("when", fsdp_worker.ONESHOT)
def test_oneshot_masks_under_fsdp(ranks, when):
    """sparsetorch.prune before fully_shard (masks sharded at the first optimizer step) or after it (global
    magnitude ranked by the distributed threshold), or masks derived from a pruned model's zeros on the
    sharded weights: the single process's masks, kept through training."""
    _, reports, tensors = ranks
    _, snaps, _ = fsdp_worker.run_oneshot(STEPS, 0, 1, when)
    assert_same_run(steps_of(tensors, f"oneshot_{when}"), snaps, f"prune {when} fully_shard")
    assert reports[0][f"oneshot_{when}_sharded"] and reports[1][f"oneshot_{when}_sharded"]


def test_a_sparsifier_attached_before_fully_shard_is_a_clear_error(ranks):
    _, reports, _ = ranks
    for report in reports:
        assert "attached before fully_shard" in report["attach_before_wrap"]
        assert "after fully_shard" in report["attach_before_wrap"]


def test_what_fsdp2_does_not_support_is_a_clear_error(ranks):
    out, reports, _ = ranks
    for rank, report in enumerate(reports):
        lottery, training_state, sparsifier_state = report["refusals"]
        assert "FSDP2" in lottery and "DDP" in lottery
        assert "save_distributed_state" in training_state and "save_distributed_state" in sparsifier_state
        assert not (out / f"refused{rank}").exists()  # nothing written


def test_dcp_resume_is_bitwise_on_the_same_world_size(ranks):
    _, reports, _ = ranks
    assert reports[0]["resume_bitwise"] and reports[1]["resume_bitwise"]


def test_dcp_checkpoint_of_two_ranks_loads_on_one_process(ranks):
    """Resharding 2 -> 1: the plain model gets the FSDP2 run's weights (zeros in place) and masks, and training
    on continues like the FSDP2 run."""
    from sparsetorch.integrations import load_distributed_state

    out, _, tensors = ranks
    fsdp = steps_of(tensors, "fsdp/RigL_adamw")
    model = fsdp_worker.make_model()
    optimizer = fsdp_worker.make_optimizer(model, "adamw")
    sparsifier = fsdp_worker.build("RigL")
    extra = load_distributed_state(model, out / "ckpt", optimizer, sparsifier)
    assert extra == {"step": fsdp_worker.RESUME_AT} and sparsifier.step_count == fsdp_worker.RESUME_AT
    loaded = fsdp_worker.snapshot(model)
    for name, value in fsdp[fsdp_worker.RESUME_AT].items():
        assert torch.equal(loaded[name], value), name
    assert all(not isinstance(v, torch.distributed.tensor.DTensor) for v in model.state_dict().values())
    for item in sparsetorch.iter_masks(model):
        assert not model.state_dict()[item.qualified_name][~item.mask].any()
    on = fsdp_worker.train(model, optimizer, sparsifier, range(fsdp_worker.RESUME_AT, STEPS))
    assert_same_run(on, fsdp[fsdp_worker.RESUME_AT + 1:], "resumed on 1 process vs FSDP2")


def test_dcp_checkpoint_without_a_sparsifier_carries_the_masks(ranks):
    """Fine-tuning one-shot masks under FSDP2 without a sparsifier: the checkpoint restores them on 1 process."""
    from sparsetorch.integrations import load_distributed_state

    out, _, tensors = ranks
    final = steps_of(tensors, "oneshot_after")[STEPS]
    model = fsdp_worker.make_model()
    assert load_distributed_state(model, out / "oneshot_ckpt") == {}
    masks = {f"{item.qualified_name}_mask": item.mask for item in sparsetorch.iter_masks(model)}
    assert masks and masks.keys() == {k for k in final if k.endswith("_mask")}
    for name, value in fsdp_worker.snapshot(model).items():
        assert torch.equal(value, final[name]), name


def test_compile_under_fsdp_does_not_recompile_on_mask_updates(ranks):
    _, reports, _ = ranks
    for report in reports:
        result = report["compile"]
        assert result["zero"] and any(m > 0 for m in result["moved"][1:])
        assert result["unique_graphs"] <= 1


def test_dcp_checkpoint_that_does_not_fit_is_refused_before_anything_changes(ranks):
    from sparsetorch.integrations import load_distributed_state
    from sparsetorch.models import MLP

    out, _, _ = ranks
    for model, sparsifier in [(MLP((12, 20, 16, 3)), fsdp_worker.build("RigL")),   # another width
                              (fsdp_worker.make_model(), sparsetorch.RigL(include=["fc1"]))]:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(sparsetorch.SparsityError, match="does not fit the model|does not match the layers"):
            load_distributed_state(model, out / "ckpt", sparsifier=sparsifier)
        assert sparsifier.model is None and not list(sparsetorch.iter_masks(model))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(sparsetorch.SparsityError, match="no complete DCP checkpoint"):
        load_distributed_state(fsdp_worker.make_model(), out / "missing")


@pytest.mark.parametrize("attached", [False, True], ids=["unattached", "attached"])
def test_dcp_load_that_fails_midway_changes_nothing(tmp_path, attached):
    """A shard that is damaged or missing (found by DCP only while reading): a SparsityError saying so, and the
    model's weights and masks and the sparsifier are as they were (the load reads into new tensors first).
    On one process (DCP without a process group), then the same load from an intact copy succeeds."""
    import shutil

    from sparsetorch.integrations import load_distributed_state, save_distributed_state

    model = fsdp_worker.make_model()
    optimizer = fsdp_worker.make_optimizer(model, "adamw")
    sparsifier = fsdp_worker.build("RigL").attach(model, optimizer)
    fsdp_worker.train(model, optimizer, sparsifier, range(2))
    save_distributed_state(model, tmp_path / "ckpt", optimizer, sparsifier, extra={"step": 2})
    saved = fsdp_worker.snapshot(model)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "intact")
    shards = sorted((tmp_path / "ckpt").glob("*.distcp"))
    assert shards
    with open(shards[0], "r+b") as fh:  # cut short: the metadata still lists every tensor
        fh.truncate(fh.seek(0, 2) // 2)

    model = fsdp_worker.make_model()
    optimizer = fsdp_worker.make_optimizer(model, "adamw")
    sparsifier = fsdp_worker.build("RigL")
    if attached:
        sparsifier.attach(model, optimizer)
    before = fsdp_worker.snapshot(model)
    for broken in ("truncated", "missing"):
        if broken == "missing":
            shards[0].unlink()
        with pytest.raises(sparsetorch.SparsityError, match="could not be read.*damaged.*Nothing was loaded"):
            load_distributed_state(model, tmp_path / "ckpt", optimizer, sparsifier)
        after = fsdp_worker.snapshot(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), broken
        assert (sparsifier.model is not None) == attached and sparsifier.step_count == 0
    assert load_distributed_state(model, tmp_path / "intact", optimizer, sparsifier) == {"step": 2}
    loaded = fsdp_worker.snapshot(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert sparsifier.step_count == 2
