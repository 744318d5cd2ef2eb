"""Distributed calibration: two gloo processes launched with torchrun, each pruning with its own shard of the
calibration set, end with identical models, equal to one process on the whole set.

The tolerance: every statistic is accumulated in float64 from per-item float32 terms and handed to the
solvers in float32 (``InputStats``). One process sums the items in order; the ranks sum their shards and
the all-reduce adds the two sums: the float64 totals differ by a few float64 ulps, which round to the
same float32 value unless a total lies within them of a float32 rounding boundary (about one entry in
10^8), and then that entry differs by one float32 ulp. So the ranks' masks and weights are bitwise those
of one process except in that rare case (a large model has a few such entries, and a mask can then differ
where two weights tie within that ulp); on the fixed data below no entry is in it, and the test asserts
bitwise equality for every method. (With float32 accumulation, SparseGPT on a 4 x 256 Llama flipped 0.3% of
its mask entries between 2 processes and 1, exactly as much as one process given the items in reverse
order: benchmarks/bench_distributed_calibration.py.) Between the two ranks everything is always bitwise
identical: the all-reduce hands each the same bits, and the pruned layers are checked after each block.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oneshot_dist_worker as worker
from test_ddp import torchrun
from sparsetorch.oneshot.linear_layers import InputStats

pytest.importorskip("transformers")  # the MoE case is a tiny Mixtral built from a config


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
    assert {key.split("/")[0] for key in tensors0} == {*worker.CASES, "disagree", "ooc"}
    for key in tensors0:
        assert torch.equal(tensors0[key], tensors1[key]), key
    for name in worker.CASES:
        case0, case1 = report0["cases"][name], report1["cases"][name]
        assert case0 == case1 and case0["world_size"] == 2
        assert case0["from_rank0"] == []  # identical statistics: the ranks agreed without a broadcast
    assert report0["cases"]["one_pass"]["mode"] == "one-pass" and report0["cases"]["moe"]["mode"] == "sequential"


@pytest.mark.parametrize("name", list(worker.CASES))
def test_each_case_equals_one_process_on_the_whole_set_bitwise(ranks, name, one_thread):
    (report0, tensors0), _ = ranks
    model = worker.prune_case(name)
    single = worker.tensors_of(model)
    mine = {k.split("/", 1)[1]: v for k, v in tensors0.items() if k.startswith(f"{name}/")}
    assert mine.keys() == single.keys()
    assert any(k.startswith("mask/") for k in single)
    for key in single:
        assert torch.equal(mine[key], single[key]), f"{name}: {key} differs from one process on the whole set"
    stats = model.sparsetorch_stats
    assert report0["cases"][name]["targets"] == [r.target for r in stats.layers]  # OWL: the same per-block targets
    assert report0["cases"][name]["unrouted"] == stats.unrouted


def test_out_of_core_under_torchrun_equals_one_process(ranks, tmp_path, one_thread):
    """A checkpoint folder pruned out of core by 2 ranks (each its shard, rank 0 writing) holds bitwise the files
    one process writes from the whole set."""
    from sparsetorch.oneshot import prune_oneshot

    (report0, tensors0), (report1, _) = ranks
    assert report0["ooc"] == report1["ooc"] == {"world_size": 2, "complete": True}
    worker.ooc_llama().save_pretrained(tmp_path / "checkpoint")
    prune_oneshot(str(tmp_path / "checkpoint"), worker.ooc_items(), method="sparsegpt", sparsity=0.5,
                  out=str(tmp_path / "pruned"), progress=False)
    single = worker.folder_tensors(str(tmp_path / "pruned"))
    mine = {k.split("/", 1)[1]: v for k, v in tensors0.items() if k.startswith("ooc/")}
    assert mine.keys() == single.keys() and any(k.endswith("down_proj.weight") for k in single)
    for key in single:
        assert torch.equal(mine[key], single[key]), key
    assert float((single["model.layers.0.mlp.down_proj.weight"] == 0).float().mean()) == 0.5


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
    one = {"a": InputStats(4, torch.device("cpu"), True), "expert": InputStats(4, torch.device("cpu"), True)}
    one["a"].add(x0)  # one process, the same rows as two items
    one["a"].add(x1)
    one["expert"].add(expert)
    for key in ("a", "expert"):  # the float32 statistics one process hands the solvers, bit for bit
        assert torch.equal(torch.tensor(c0["hessians"][key]), one[key].xtx.flatten()), key
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


def test_fingerprint_is_exact_and_order_free():
    from sparsetorch.core.distributed import agree_with_rank0, disagreeing, fingerprint

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[123] = torch.nextafter(y[123], torch.tensor(1.0))  # one ulp
    assert fingerprint(x) == fingerprint(x.clone()) != fingerprint(y)
    assert fingerprint(x) != fingerprint(x.flip(0))  # positions count, not only the multiset of values
    assert fingerprint(x.reshape(10, 100).t().contiguous()) != fingerprint(x)
    mask = torch.rand(9, generator=torch.Generator().manual_seed(1)) > 0.5
    assert fingerprint(mask[1:]) == fingerprint(mask[1:].clone())  # a bool view at an odd byte offset
    assert disagreeing([x]) == agree_with_rank0([x]) == []  # one process: nothing to compare


CLI_MODES = ("--in-memory", "--out-of-core")


@pytest.fixture(scope="module")
def cli_under_torchrun(tmp_path_factory):
    """``sparsetorch prune-lm`` launched by torchrun on 2 gloo processes, in memory and out of core (the two
    launches at once), and the same commands in this one process."""
    import sparsetorch
    from sparsetorch.cli.main import main

    root = tmp_path_factory.mktemp("cli_torchrun")
    worker.ooc_llama().save_pretrained(root / "model")  # no tokenizer, 1000 ids: the text goes in as bytes
    (root / "calib.txt").write_text("def f(x):\n    return x * 2 + 1\n" * 60)

    def command(mode: str, out: str) -> list[str]:  # 5 windows: 2 on rank 0, 3 on rank 1
        return ["prune-lm", str(root / "model"), "--method", "sparsegpt", "--calibration", str(root / "calib.txt"),
                "--nsamples", "5", "--seqlen", "24", "--device", "cpu", "--out", str(root / out), mode]

    src = str(Path(sparsetorch.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    launched = {mode: subprocess.Popen([*torchrun(), "--standalone", "--nproc_per_node=2", "-m", "sparsetorch.cli",
                                        *command(mode, f"ranks{mode}")], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for mode in CLI_MODES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float reductions
    try:
        for mode in CLI_MODES:
            assert main(command(mode, f"one{mode}")) == 0
    finally:
        torch.set_num_threads(threads)
    ran = {}
    for mode, proc in launched.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        ran[mode] = stdout
    return root, ran


@pytest.mark.parametrize("mode", CLI_MODES)
def test_prune_lm_under_torchrun_writes_what_one_process_writes(cli_under_torchrun, mode):
    """Each rank prunes from its shard of the windows, the statistics are summed, rank 0 alone writes and prints:
    the folder holds bitwise the tensors a single-process run writes."""
    root, stdout = cli_under_torchrun
    ranks, one = worker.folder_tensors(str(root / f"ranks{mode}")), worker.folder_tensors(str(root / f"one{mode}"))
    assert ranks.keys() == one.keys() and any(k.endswith("down_proj.weight") for k in one)
    for key in one:
        assert torch.equal(ranks[key], one[key]), key
    assert json.loads((root / f"ranks{mode}" / "oneshot.json").read_text())["world_size"] == 2
    assert json.loads((root / f"one{mode}" / "oneshot.json").read_text())["world_size"] == 1
    assert stdout[mode].count("; wrote ") == 1  # one table, rank 0's
