"""Sparse training step speed: sparsetorch SparseLinear (compressed weights, compiled fwd/dX/SDDMM kernels)
vs dense torch nn.Linear, side by side with the peer package sparselab.

    nice .venv/bin/python benchmarks/bench_training_speed.py                 # 4096x4096, B=256, 90/95/99%
    .venv/bin/python benchmarks/bench_training_speed.py --rounds 5 --no-peer # quicker, sparsetorch only
    .venv/bin/python benchmarks/bench_training_speed.py --transformer --checkpoint  # ~38M GPT: step time, memory

One step = forward + backward (dX and the weight gradient) of one layer, input [256, 4096] with
requires_grad, a fixed upstream gradient. All candidates of one process are timed interleaved (one step of
each per round, in turn) and the median of the rounds is reported, so a burst of load from other jobs on a
shared machine hits every candidate alike. sparselab runs in its own virtualenv (.venv-peers, same torch
version) in a subprocess after ours, with its own interleaved dense baseline; each speedup is against the
dense layer measured in the same process. Writes benchmarks/results/bench_training_speed.json.

--transformer: the repo's byte-level GPT (sparsetorch.models.GPT) at 12 blocks of width 512, ~38M parameters,
dense against the same model with every attention and MLP Linear a 90%-sparse SparseLinear trained with
CompressedRigL (one RigL update inside the measured steps): median AdamW step time and training memory (peak
RSS during training minus RSS before the model is built; raw peak RSS too), at two batch sizes (and with
activation checkpointing, --checkpoint), each variant in fresh processes, alternating; the peer's variant
(unless --no-peer) swaps the same layers for sparselab.SparseLinear(sparsity=0.9) (static connectivity: its
step has no RigL update to pay for), run by .venv-peers with this repo's src/ on PYTHONPATH.
Writes benchmarks/results/bench_training_transformer[_fixed_malloc][_Nthreads].json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PEER_PYTHON = ROOT.parent / ".venv-peers" / "bin" / "python"


def _time_interleaved(layers: dict, x, dy, rounds: int, warmup: int = 2) -> dict:
    times = {name: [] for name in layers}
    for r in range(warmup + rounds):
        for name, layer in layers.items():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            t0 = time.perf_counter()
            layer(x).backward(dy)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "rounds": len(v)}
            for name, v in times.items()}


def worker(kind: str, size: int, batch: int, sparsities: list[float], threads: int, rounds: int) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    layers = {"dense": torch.nn.Linear(size, size)}
    if kind == "sparsetorch":
        from sparsetorch.sparse_training import SparseLinear, has_kernels

        for s in sparsities:
            layers[f"{s:g}"] = SparseLinear(size, size, s, generator=torch.Generator().manual_seed(0))
        info = {"kernels": has_kernels()}
    else:
        import sparselab

        for s in sparsities:
            layers[f"{s:g}"] = sparselab.SparseLinear(size, size, sparsity=s)
        info = {"sparselab": sparselab.__version__}
    x = torch.randn(batch, size, requires_grad=True)
    dy = torch.randn(batch, size)
    return {"kind": kind, "torch": torch.__version__, **info, "times": _time_interleaved(layers, x, dy, rounds)}


# ---------------------------------------------------------------- whole transformer (--transformer)
GPT_SHAPE = dict(layers=12, width=512, heads=8, context=256)  # the repo's byte-level GPT scaled to ~38M parameters
SEQ = 256


def _rss_mb(field: str = "VmRSS:") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Set the peak RSS (VmHWM) to the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(kind: str, shape: dict, checkpoint: bool, every: int):
    """(model, optimizer, sparsifier or None) for one variant."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint as ckpt

    from sparsetorch.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**shape))
    if kind == "sparse":
        from sparsetorch.sparse_training import to_sparse_training

        to_sparse_training(model, 0.9, "uniform", generator=torch.Generator().manual_seed(0))
    elif kind == "sparselab":  # the peer: the same Linear layers as its SparseLinear (static connectivity)
        import sparselab

        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name != "lm_head":
                model.set_submodule(name, sparselab.SparseLinear(m.in_features, m.out_features,
                                                                 bias=m.bias is not None, sparsity=0.9))
    if checkpoint:  # activation checkpointing per block (both variants): keep block inputs, recompute the rest
        class Checkpointed(nn.Module):
            def __init__(self, block):
                super().__init__()
                self.block = block

            def forward(self, x):
                return ckpt(self.block, x, use_reentrant=False)

        model.blocks = nn.ModuleList(Checkpointed(b) for b in model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    dst = None
    if kind == "sparse":
        from sparsetorch.sparse_training import CompressedRigL

        dst = CompressedRigL(every=every, drop_fraction=0.3, generator=torch.Generator().manual_seed(0))
        dst.attach(model, opt)
    return model, opt, dst


def _train_step(model, opt, dst, ids) -> float:
    loss = model.loss(ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if dst is not None:
        dst.step()
    return loss.item()


def transformer_worker(kind: str, threads: int, steps: int, batch: int, checkpoint: bool, every: int) -> dict:
    """One training run in this process: build, one warm-up step (Adam allocates its state), then ``steps``
    measured steps (the sparse run's RigL updates at every ``every``-th step), the peak RSS read per step."""
    import gc

    import torch

    from sparsetorch.oneshot.heap import return_freed_memory  # what building freed is not training memory

    torch.set_num_threads(threads)
    # the libraries' own memory (lazy imports of the optimizer, autograd, checkpoint, our extension) is not
    # training memory: a tiny model of the same kind trains two steps before the baseline is read
    tiny = _build(kind, dict(layers=1, width=64, heads=2, context=16), checkpoint, 1)
    for _ in range(2):
        _train_step(*tiny, torch.randint(0, 256, (2, 17)))
    del tiny
    gc.collect()
    return_freed_memory()
    torch.manual_seed(0)
    base = _rss_mb()  # libraries loaded and warm, no model yet
    model, opt, dst = _build(kind, GPT_SHAPE, checkpoint, every)
    params = sum(p.numel() for p in model.parameters())
    sparse_dense_params = sum(m.in_features * m.out_features for m in model.modules()
                              if type(m).__name__ == "SparseLinear")
    ids = torch.randint(0, 256, (batch, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return_freed_memory()  # what building freed (the dense weights the sparse model came from) is not training
    built = _rss_mb()
    _reset_peak()
    times, updates, peaks, update_peaks = [], [], [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = _train_step(model, opt, dst, ids)
        dt = time.perf_counter() - t0
        update = dst is not None and dst.is_update_step(dst.step_count)
        if i:  # step 0 allocates Adam's state (its peak still counts below)
            (updates if update else times).append(dt)
        (update_peaks if update else peaks).append(_rss_mb("VmHWM:"))
        _reset_peak()
    peak = max(peaks + update_peaks)
    return {"kind": kind, "batch": batch, "checkpoint": checkpoint, "params": params,
            "sparse_layers_dense_params": sparse_dense_params, "step_ms": 1e3 * statistics.median(times),
            "update_step_ms": 1e3 * statistics.median(updates) if updates else None,
            "rigl_updates": 0 if dst is None else len(dst.history) - 1,
            "baseline_mb": base, "built_mb": built, "peak_rss_mb": peak, "train_mb": peak - base,
            "train_mb_without_update": max(peaks) - base,
            "train_mb_update_step": max(update_peaks) - base if update_peaks else None, "loss": loss}


def transformer_main(args) -> dict:
    batches = [int(b) for b in args.tbatches.split(",")]
    settings = [(b, False) for b in batches] + ([(batches[0], True)] if args.checkpoint else [])
    settings = [(b, c, "fixed" if args.fixed_malloc else "default") for b, c in settings]
    kinds = ("dense", "sparse") + (("sparselab",) if PEER_PYTHON.exists() and not args.no_peer else ())
    runs = []
    for batch, checkpoint, malloc in settings:
        env = dict(os.environ)
        if malloc == "fixed":  # glibc: every block >= 128 KB is mmapped and unmapped on free
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        for _ in range(args.repeats):  # dense, sparse, dense, sparse: each in a fresh process (clean peak memory)
            for kind in kinds:
                python = sys.executable
                if kind == "sparselab":  # the peer's own virtualenv; the GPT comes from this repo's src/
                    python, env = str(PEER_PYTHON), {**env, "PYTHONPATH": str(ROOT.parent / "src")}
                cmd = [python, __file__, "--transformer", "--worker", kind, "--threads", str(args.threads),
                       "--tsteps", str(args.tsteps), "--tbatches", str(batch)] + (["--checkpoint"] if checkpoint else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-2000:])
                runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "malloc": malloc})
    p = runs[0]["params"]
    print(f"# model: sparsetorch.models.GPT(layers=12, width=512, heads=8, context=256), byte vocabulary 256: "
          f"{p / 1e6:.1f}M parameters dense; sparse: to_sparse_training(0.9, 'uniform') makes every attention "
          f"(qkv, proj) and MLP (fc, proj) Linear a 90%-sparse SparseLinear (embeddings, LayerNorms, lm_head dense), "
          f"trained with CompressedRigL (update every {args.tsteps // 2 + 1} steps, inside the measured window)"
          + ("; sparselab: the same layers as sparselab.SparseLinear(sparsity=0.9), static, in its own venv"
             if "sparselab" in kinds else ""))
    print(f"# AdamW, sequence {SEQ}, {args.tsteps} measured steps per process after one warm-up step, "
          f"{args.repeats} process(es) per variant; train MB = peak RSS during training minus RSS before the model "
          f"was built (libraries loaded and warmed up by a tiny model); no-upd MB: the same over steps without a "
          f"RigL update; raw peak RSS alongside"
          + ("; malloc 'fixed': MALLOC_MMAP_THRESHOLD_=131072, so freed tensors go back to the OS at once and RSS "
             "follows live memory (glibc's default raises the threshold as large blocks are freed and keeps "
             "freed heap)" if args.fixed_malloc else ""))
    print(f"{'malloc':<8} {'batch':>11} {'ckpt':>5} {'model':<9} {'params':>11} {'step ms':>8} {'upd. ms':>8} "
          f"{'train MB':>9} {'no-upd MB':>9} {'peak RSS':>9}")
    rows = []
    for batch, checkpoint, malloc in settings:
        sel = {k: [r for r in runs if (r["batch"], r["checkpoint"], r["malloc"], r["kind"]) ==
                   (batch, checkpoint, malloc, k)] for k in kinds}
        best = {k: min(v, key=lambda r: r["step_ms"]) for k, v in sel.items()}
        mem = {k: min(r["train_mb"] for r in v) for k, v in sel.items()}
        plain = {k: min(r["train_mb_without_update"] for r in v) for k, v in sel.items()}
        raw = {k: min(r["peak_rss_mb"] for r in v) for k, v in sel.items()}
        for k in kinds:
            upd = best[k]["update_step_ms"]
            print(f"{malloc:<8} {batch:>4} x {SEQ:<4} {'yes' if checkpoint else 'no':>5} {k:<9} {best[k]['params']:>11,} "
                  f"{best[k]['step_ms']:>8.0f} {'-' if upd is None else str(round(upd)):>8} {mem[k]:>9.0f} "
                  f"{plain[k]:>9.0f} {raw[k]:>9.0f}")
        row = {"batch": batch, "seq": SEQ, "checkpoint": checkpoint, "malloc": malloc,
               "step_ratio": best["sparse"]["step_ms"] / best["dense"]["step_ms"],
               "memory_ratio": mem["sparse"] / mem["dense"],
               "memory_ratio_without_update": plain["sparse"] / plain["dense"],
               "raw_rss_ratio": raw["sparse"] / raw["dense"], "train_mb": mem, "train_mb_without_update": plain,
               "peak_rss_mb": raw}
        if "sparselab" in kinds:
            row.update(sparselab_step_ratio=best["sparselab"]["step_ms"] / best["dense"]["step_ms"],
                       sparselab_memory_ratio=mem["sparselab"] / mem["dense"])
        rows.append(row)
        print(f"{'':>20} sparse/dense: step time {row['step_ratio']:.2f}, training memory {row['memory_ratio']:.2f} "
              f"(steps without a RigL update {row['memory_ratio_without_update']:.2f}; raw peak RSS "
              f"{row['raw_rss_ratio']:.2f})")
        if "sparselab" in kinds:
            print(f"{'':>20} sparselab/dense: step time {row['sparselab_step_ratio']:.2f}, training memory "
                  f"{row['sparselab_memory_ratio']:.2f}; sparsetorch is {row['sparselab_step_ratio'] / row['step_ratio']:.2f}x "
                  "faster than sparselab")
    return {"model": {**GPT_SHAPE, "vocab": 256, "params": p, "sparsity": 0.9, "seq": SEQ}, "rows": rows,
            "runs": runs}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sparsities", default="0.9,0.95,0.99")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-peer", action="store_true", help="skip sparselab")
    ap.add_argument("--transformer", action="store_true", help="whole-model step time and peak memory instead")
    ap.add_argument("--tsteps", type=int, default=4, help="--transformer: measured steps per process")
    ap.add_argument("--tbatches", default="8,2", help="--transformer: batch sizes (sequences of 256 bytes)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="--transformer: also the first batch size with activation checkpointing per block")
    ap.add_argument("--fixed-malloc", action="store_true",
                    help="--transformer: run with MALLOC_MMAP_THRESHOLD_=131072 (RSS = live memory); writes "
                         "bench_training_transformer_fixed_malloc.json")
    ap.add_argument("--repeats", type=int, default=1, help="--transformer: processes per variant and setting")
    ap.add_argument("--worker", choices=["sparsetorch", "sparselab", "dense", "sparse"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_training_speed.json"))
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.transformer and args.worker:
        print(json.dumps(transformer_worker(args.worker, args.threads, args.tsteps, int(args.tbatches),
                                            args.checkpoint, args.tsteps // 2 + 1)))
        return 0
    if args.transformer:
        command = "python benchmarks/bench_training_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{_cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads"
        load = os.getloadavg()[0]
        print(f"# command: {command.strip()}\n# machine: {machine}\n# date: {date}\n# load average: {load:.1f}")
        result = {"command": command.strip(), "machine": machine, "date": date, "load": load, **transformer_main(args)}
        out = Path(args.out).with_name("bench_training_transformer" + ("_fixed_malloc" if args.fixed_malloc else "")
                                       + (f"_{args.threads}threads" if args.threads != 1 else "") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"# wrote {out}")
        return 0
    if args.worker:  # subprocess mode: print one JSON line
        print(json.dumps(worker(args.worker, args.size, args.batch, sparsities, args.threads, args.rounds)))
        return 0

    load_before = os.getloadavg()
    runs = [worker("sparsetorch", args.size, args.batch, sparsities, args.threads, args.rounds)]
    if not args.no_peer:
        if PEER_PYTHON.exists():
            cmd = [str(PEER_PYTHON), __file__, "--worker", "sparselab", "--size", str(args.size), "--batch",
                   str(args.batch), "--sparsities", args.sparsities, "--threads", str(args.threads), "--rounds",
                   str(args.rounds)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                print(f"sparselab run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            print(f"sparselab skipped: {PEER_PYTHON} not found (python3 -m venv .venv-peers && "
                  ".venv-peers/bin/pip install torch==2.13.0 sparselab)", file=sys.stderr)
    load_after = os.getloadavg()

    command = "python benchmarks/bench_training_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{_cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads"
    print(f"# command: {command.strip()}\n# machine: {machine}\n# date: {date}")
    print(f"# load average before/after (1 min): {load_before[0]:.1f} / {load_after[0]:.1f} "
          f"(the CPU is shared with other jobs; ratios within one process are interleaved)")
    print(f"# layer {args.size}x{args.size}, batch {args.batch}, step = forward + backward (dX, dW), median of "
          f"{args.rounds} rounds")
    print(f"{'package':<12} {'sparsity':>8} {'step ms':>9} {'dense ms':>9} {'speedup':>8}")
    rows = []
    for run in runs:
        dense = run["times"]["dense"]["median_ms"]
        for s in sparsities:
            t = run["times"][f"{s:g}"]["median_ms"]
            rows.append({"package": run["kind"], "sparsity": s, "step_ms": t, "dense_ms": dense,
                         "speedup": dense / t})
            print(f"{run['kind']:<12} {s:>8.2f} {t:>9.1f} {dense:>9.1f} {dense / t:>7.2f}x")
    result = {"command": command.strip(), "machine": machine, "date": date, "load_before": load_before,
              "load_after": load_after, "size": args.size, "batch": args.batch, "threads": args.threads,
              "rounds": args.rounds, "rows": rows, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
