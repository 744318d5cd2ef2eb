"""Two DDP processes launched with torchrun (gloo, CPU): replicas never diverge.

Masks and weights are hashed on every rank after every step; the final masks must also match
a single process trained on the whole batch, which catches a method that scores on its local
gradient (DDP averages gradients, so the full-batch run is what both replicas compute).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsetorch

import ddp_worker

STEPS = 6


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(), "--standalone", "--nproc_per_node=2", str(Path(ddp_worker.__file__)), str(out), str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(json.loads((out / f"rank{r}.json").read_text()), load_file(out / f"rank{r}.safetensors")) for r in (0, 1)]


def test_replicas_agree_after_every_step(ranks):
    (report0, masks0), (report1, masks1) = ranks
    assert report0.keys() == report1.keys() and {"swap", "swap_before_wrap", "compressed_rigl"} <= set(report0)
    for key in report0:
        assert report0[key]["digests"] == report1[key]["digests"], f"{key}: replicas diverged"
        assert report0[key]["history"] == report1[key]["history"], key
        assert len(report0[key]["digests"]) == STEPS + 1
    assert masks0.keys() == masks1.keys()
    for name in masks0:
        assert torch.equal(masks0[name], masks1[name]), name
    # swap draws from a different seed on each rank, so agreement comes from the broadcast
    assert any(row["moved"] > 0 for row in report0["swap"]["history"][1:])


@pytest.mark.parametrize("method", list(ddp_worker.methods()))
def test_ddp_masks_equal_a_single_process_on_the_whole_batch(ranks, method):
    (_, masks0), _ = ranks
    model = ddp_worker.make_model()
    sparsifier = ddp_worker.methods()[method](torch.Generator().manual_seed(7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier.attach(model, optimizer)
    ddp_worker.train(model, optimizer, sparsifier, STEPS)
    for item in sparsetorch.iter_masks(model):
        assert torch.equal(item.mask, masks0[f"{method}/{item.qualified_name}"]), item.qualified_name


def test_compressed_rigl_under_ddp_equals_a_single_process_on_the_whole_batch(ranks):
    (report0, tensors0), (_, tensors1) = ranks
    assert any(row["moved"] > 0 for row in report0["compressed_rigl"]["history"][1:])
    model = ddp_worker.make_compressed_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = ddp_worker.compressed_rigl(torch.Generator().manual_seed(7)).attach(model, optimizer)
    ddp_worker.train(model, optimizer, sparsifier, STEPS)
    for name, positions in ddp_worker.connectivity(model).items():
        assert torch.equal(tensors0[f"compressed_rigl/{name}"], tensors1[f"compressed_rigl/{name}"]), name
        assert torch.equal(tensors0[f"compressed_rigl/{name}"], positions), name


def test_distill_under_ddp_equals_a_single_process_on_the_whole_batch(ranks):
    """Each rank distils on its half of every batch; the replicas stay equal, the masks exact, and the result is
    the single-process run on the whole batch (up to the all-reduce's float rounding)."""
    (_, tensors0), (_, tensors1) = ranks
    single = ddp_worker.run_distill(STEPS).state_dict()
    for name, value in single.items():
        key = f"distill/{name}"
        assert torch.equal(tensors0[key], tensors1[key]), name
        torch.testing.assert_close(tensors0[key], value, rtol=1e-4, atol=1e-5)
    student = ddp_worker.run_distill(STEPS)
    assert any(True for _ in sparsetorch.iter_masks(student))
    for item in sparsetorch.iter_masks(student):
        w = tensors0[f"distill/{item.qualified_name}"]
        assert not w[~item.mask].any(), item.qualified_name
