"""Distributed calibration: two gloo processes launched with torchrun, each pruning with its own shard of the
calibration set, end with identical models, equal to one process on the whole set.

Masks must be exactly equal to the single process's. Weights: a rank's statistics are sums in a different
order than one process's (each rank sums its shard, then the two sums are added), which changes them by a
few float32 ulps; SparseGPT and ALPS turn those into weight updates through the (damped, here near-singular:
fewer tokens than inputs) inverse Hessian and later blocks see the slightly different outputs, so updated
weights differ by up to about 1e-4 x max|W| (measured: 7e-5 for ALPS). That is the float noise of the
method itself: one process given the same items in reverse order moves them as much (5e-5 for ALPS). So
the tolerance is stated relative to that noise: per case, the largest weight difference to one process,
relative to each tensor's max|W|, is at most ``NOISE_FACTOR`` x that of the reversed order in one process
(plus 1e-6), and never above ``REL_ATOL``. Methods that only mask keep the dense values: exactly equal.
Between the two ranks everything is bitwise identical.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oneshot_dist_worker as worker

pytest.importorskip("transformers")  # the MoE case is a tiny Mixtral built from a config
MASK_ONLY = {"wanda", "wanda_2:4", "owl", "ria_dsnot"}  # dense values kept (DSnoT regrows at dense values)
REL_ATOL = 2e-4
NOISE_FACTOR = 4


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot_dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(), "--standalone", "--nproc_per_node=2", str(Path(worker.__file__)), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(json.loads((out / f"rank{r}.json").read_text()), load_file(out / f"rank{r}.safetensors")) for r in (0, 1)]


def test_both_ranks_end_bitwise_identical(ranks):
    (report0, tensors0), (report1, tensors1) = ranks
    assert tensors0.keys() == tensors1.keys()
    assert {key.split("/")[0] for key in tensors0} == {*worker.CASES, "disagree"}
    for key in tensors0:
        assert torch.equal(tensors0[key], tensors1[key]), key
    for name in worker.CASES:
        case0, case1 = report0["cases"][name], report1["cases"][name]
        assert case0 == case1 and case0["world_size"] == 2
        assert case0["from_rank0"] == []  # identical statistics: the ranks agreed without a broadcast
    assert report0["cases"]["one_pass"]["mode"] == "one-pass" and report0["cases"]["moe"]["mode"] == "sequential"


@pytest.mark.parametrize("name", list(worker.CASES))
def test_each_case_equals_one_process_on_the_whole_set(ranks, name, one_thread):
    (report0, tensors0), _ = ranks
    model = worker.prune_case(name)
    single = worker.tensors_of(model)
    mine = {k.split("/", 1)[1]: v for k, v in tensors0.items() if k.startswith(f"{name}/")}
    assert mine.keys() == single.keys()
    masks = [k for k in single if k.startswith("mask/")]
    assert masks
    for key in masks:
        assert torch.equal(mine[key], single[key]), f"{name}: mask {key} differs from one process's"
    if name in MASK_ONLY:
        for key in single:
            assert torch.equal(mine[key], single[key]), key
    else:
        reordered = worker.tensors_of(worker.prune_case(name, worker.CASES[name][1]()[::-1]))
        distributed, noise = _worst_relative(mine, single), _worst_relative(reordered, single)
        assert distributed <= min(NOISE_FACTOR * noise + 1e-6, REL_ATOL), (name, distributed, noise)
    stats = model.sparsetorch_stats
    assert report0["cases"][name]["targets"] == [r.target for r in stats.layers]  # OWL: the same per-block targets
    assert report0["cases"][name]["unrouted"] == stats.unrouted


def _worst_relative(a: dict, b: dict) -> float:
    """max over float tensors of max|a - b| / max|b|."""
    return max(float((a[k] - b[k]).abs().max()) / (float(b[k].abs().max()) or 1.0)
               for k in b if b[k].is_floating_point())


def test_a_rank_that_solves_differently_takes_rank_0s_result(ranks):
    """Rank 1's solver was perturbed: its layers differ before the check, so every layer is taken from rank 0
    (listed on both ranks), and the result is exactly the unperturbed distributed run's."""
    (report0, tensors0), (report1, tensors1) = ranks
    taken = report0["disagree"]["from_rank0"]
    assert taken == report1["disagree"]["from_rank0"]
    assert "blocks.0.attn.qkv" in taken and "blocks.1.mlp.proj" in taken
    for key in tensors0:
        if key.startswith("disagree/"):
            assert torch.equal(tensors0[key], tensors1[key]), key
            assert torch.equal(tensors0[key], tensors0[key.replace("disagree/", "sparsegpt/", 1)]), key


def test_owl_case_spreads_sparsity_over_blocks(ranks):
    (report0, _), _ = ranks
    targets = report0["cases"]["owl"]["targets"]
    assert len(set(round(t, 6) for t in targets)) > 1  # non-uniform, or the OWL check above would be trivial


def test_statistics_sum_over_ranks_with_uneven_tokens_and_an_expert_routed_on_one_rank(ranks):
    """Counts and X^T X are sums over every rank's tokens: rank 0 added 3 rows, rank 1 4 rows; the expert only
    got rows on rank 1, yet both ranks see its 2 tokens (an expert is unrouted only if no rank routed to it)."""
    (report0, _), (report1, _) = ranks
    c0, c1 = report0["collectives"], report1["collectives"]
    assert c0["counts"] == c1["counts"] == {"a": 7, "expert": 2}
    assert c0["hessians"] == c1["hessians"]
    g0, g1 = torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)
    x0, x1 = torch.randn(3, 4, generator=g0), torch.randn(4, 4, generator=g1)
    expert = torch.randn(2, 4, generator=g1)
    whole = torch.cat([x0, x1])
    assert torch.allclose(torch.tensor(c0["hessians"]["a"]), (whole.T @ whole).flatten(), atol=1e-5)
    assert torch.allclose(torch.tensor(c0["hessians"]["expert"]), (expert.T @ expert).flatten(), atol=1e-5)
    assert c0["failed"] is False
    # a tensor that differs on rank 1 is replaced by rank 0's; the one already equal is left alone
    assert c0["taken"] == c1["taken"] == [1]
    assert c0["agreed"] == c1["agreed"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_bad_input_on_one_rank_raises_on_every_rank(ranks):
    (report0, _), (report1, _) = ranks
    e0, e1 = report0["errors"], report1["errors"]
    assert "integer tensor" in e1["bad_shard"] and "another rank rejected its calibration shard" in e0["bad_shard"]
    assert "could not be run through the model" in e1["failed_forward"]
    assert "another rank could not run its calibration shard" in e0["failed_forward"]
    assert e0["different_models"] == e1["different_models"]
    assert "ranks hold different weights" in e0["different_models"] and "blocks.1.attn.proj" in e0["different_models"]


def test_shard_calibration_covers_every_item_once():
    from sparsetorch import SparsityError
    from sparsetorch.oneshot import shard_calibration

    items = list(range(7))
    shards = [shard_calibration(items, rank=r, world_size=3) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert shard_calibration(items) == items  # one process: everything
    with pytest.raises(SparsityError, match="every rank needs at least one"):
        shard_calibration(items[:2], rank=0, world_size=3)
    with pytest.raises(SparsityError, match="0 <= rank < world_size"):
        shard_calibration(items, rank=3, world_size=3)
