"""The training loop of benchmarks/bench_gpt_sparse_training.py on a tiny byte GPT: RigL at 90% on compressed
FFN layers learns, keeps the FFN density exactly at target, and grows where the dense gradient is largest."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sparsetorch.data.text import load_stdlib_text, random_windows
from sparsetorch.models.gpt import GPTConfig
from sparsetorch.sparse_training import SparseLinear, to_dense

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpt_sparse_training.py"
CFG = GPTConfig(layers=2, width=32, heads=2, context=32)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpt_sparse_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text():
    return load_stdlib_text(max_bytes=300_000)


def _ffn(model):
    return {f"{i}.{n}": getattr(b.mlp, n) for i, b in enumerate(model.blocks) for n in ("fc", "proj")}


def test_rigl_on_compressed_ffn_learns_keeps_density_and_grows_by_gradient(bench, text, one_thread):
    steps, every = 12, 4  # updates after steps 4 and 8 (end = 9)
    run = bench.build("rigl", CFG, steps=steps, lr=3e-3, seed=0, every=every)
    layers = _ffn(run.model)
    assert all(isinstance(m, SparseLinear) for m in layers.values())
    assert not isinstance(run.model.blocks[0].attn.qkv, SparseLinear)  # FFN only
    nnz = {k: m.nnz for k, m in layers.items()}
    assert all(n == round(0.1 * m.in_features * m.out_features) for n, m in zip(nnz.values(), layers.values()))
    checked = 0
    for step in range(1, steps + 1):
        update = run.sparsifier.is_update_step(step)
        if update:  # the dense gradient of this step's batch, from a dense twin of the model
            twin = to_dense(copy.deepcopy(run.model))
            ids = random_windows(text.train, 16, CFG.context + 1, copy.deepcopy(run.batches))
            twin.loss(ids).backward()
            grads = {k: m.weight.grad.abs().flatten() for k, m in _ffn(twin).items()}
            before = {k: m.flat_positions() for k, m in layers.items()}
            fraction = run.sparsifier.fraction(step)
        bench.train_step(run, text.train, 16)
        if update:
            for k, m in layers.items():
                after = m.flat_positions()
                assert m.nnz == nnz[k] and after.unique().numel() == nnz[k]  # exactly the target density
                new = after[~torch.isin(after, before[k])]
                assert new.numel() > 0.5 * fraction * nnz[k]  # connections moved
                # every new connection ranks among the top round(fraction * nnz) |dL/dW| outside the old ones
                outside = grads[k].clone()
                outside[before[k]] = -1.0
                threshold = torch.topk(outside, round(fraction * nnz[k])).values[-1]
                assert (grads[k][new] >= threshold * (1 - 1e-3)).float().mean() >= 0.95
                checked += 1
    assert checked == 2 * len(layers)
    assert bench.ffn_density(run.model) == pytest.approx(0.1, abs=1e-3)
    assert sum(h["moved"] for h in run.sparsifier.history) > 0
    assert sum(run.losses[-3:]) / 3 < run.losses[0] - 0.5  # it learns


def test_interleaved_training_reports_every_variant(bench, text, one_thread):
    val = random_windows(text.val, 8, CFG.context + 1, torch.Generator().manual_seed(0))
    runs, curves = bench.train_interleaved(["dense", "rigl", "rigl-mask"], CFG, text.train, val, steps=6, batch=8,
                                           lr=3e-3, seed=0, checkpoints={3, 6}, every=2, log_every=6)
    res = bench.summarize(runs, curves)
    assert set(res) == {"dense", "rigl", "rigl-mask"}
    for name, r in res.items():
        assert r["val_curve"][6] < r["val_curve"][3] and len(r["step_ms"]) == 6
    assert res["dense"]["ffn_density"] == 1.0
    assert res["rigl"]["ffn_density"] == pytest.approx(0.1, abs=1e-3)
    assert res["rigl-mask"]["ffn_density"] == pytest.approx(0.1, abs=1e-3)
    assert res["rigl"]["moved"] > 0 and res["rigl-mask"]["moved"] > 0


def test_mask_rigl_starts_from_the_compressed_connectivity(bench):
    comp = bench.build("rigl", CFG, steps=20, lr=3e-3, seed=3)
    mask = bench.build("rigl-mask", CFG, steps=20, lr=3e-3, seed=3)
    for k, layer in _ffn(comp.model).items():
        dense = _ffn(mask.model)[k]
        assert torch.equal(dense.weight.detach().flatten().nonzero().flatten(), layer.flat_positions())
        assert torch.equal(dense.weight.detach().flatten()[layer.flat_positions()], layer.values.detach())


def test_scaled_init_matches_the_masked_reinit_and_sparse_lr_follows_density(bench):
    comp = bench.build("rigl", CFG, steps=20, lr=3e-3, seed=4)
    mask = bench.build("rigl-mask", CFG, steps=20, lr=3e-3, seed=4)
    plain = bench.build("rigl", CFG, steps=20, lr=3e-3, seed=4, init="dense", sparse_lr="same")
    for run in (comp, mask):  # the FFN group(s) at lr / 0.1, the rest at lr
        assert sorted({round(g["initial_lr"], 4) for g in run.optimizer.param_groups}) == [3e-3, 3e-2]
    assert [g["initial_lr"] for g in plain.optimizer.param_groups] == [3e-3]
    for k, layer in _ffn(comp.model).items():
        torch.testing.assert_close(layer.dense_weight(), _ffn(mask.model)[k].weight.detach())
        assert layer.values.abs().mean() > 2.5 * _ffn(plain.model)[k].values.abs().mean()  # ~sqrt(10)x
