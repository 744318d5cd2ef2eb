"""Sparse training step speed: sparsetorch SparseLinear (compressed weights, compiled fwd/dX/SDDMM kernels)
vs dense torch nn.Linear, side by side with the peer package sparselab.

    nice .venv/bin/python benchmarks/bench_training_speed.py                 # 4096x4096, B=256, 90/95/99%
    .venv/bin/python benchmarks/bench_training_speed.py --rounds 5 --no-peer # quicker, sparsetorch only
    .venv/bin/python benchmarks/bench_training_speed.py --transformer       # ~40M-param LM: step time, memory

One step = forward + backward (dX and the weight gradient) of one layer, input [256, 4096] with
requires_grad, a fixed upstream gradient. All candidates of one process are timed interleaved (one step of
each per round, in turn) and the median of the rounds is reported, so a burst of load from other jobs on a
shared machine hits every candidate alike. sparselab runs in its own virtualenv (.venv-peers, same torch
version) in a subprocess after ours, with its own interleaved dense baseline; each speedup is against the
dense layer measured in the same process. Writes benchmarks/results/bench_training_speed.json.

--transformer: a GPT-style LM (d=512, 10 blocks, vocab 8192, ~40M parameters dense) whose attention
projections and MLPs are SparseLinear at 90% (built sparse, never dense), against the same model dense:
median Adam step time and peak RSS during training, each variant in fresh processes, alternating.
Writes benchmarks/results/bench_training_transformer.json.
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
def _transformer(d: int, layers: int, vocab: int, sparsity: float | None):
    """A GPT-style LM built from nn.Linear (dense) or SparseLinear built directly, so the sparse model
    never holds a dense weight: q/k/v/o and the 4x MLP of every block are sparse, embeddings and head dense."""
    import torch
    from torch import nn

    def linear(i, o):
        if sparsity is None:
            return nn.Linear(i, o)
        from sparsetorch.sparse_training import SparseLinear

        return SparseLinear(i, o, sparsity, generator=torch.Generator().manual_seed(i * 7 + o))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = linear(d, 4 * d), linear(4 * d, d)

        def forward(self, x):  # [B, T, d]
            b, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (f(h).view(b, t, 8, d // 8).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.Sequential(*(Block() for _ in range(layers)))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

        def forward(self, ids):
            return self.head(self.ln(self.blocks(self.emb(ids))))

    return LM()


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def transformer_worker(kind: str, threads: int, steps: int, d: int, layers: int, batch: int, seq: int) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    base = _rss_mb("VmRSS:")  # torch and libraries loaded, no model yet
    model = _transformer(d, layers, 8192, None if kind == "dense" else 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())
    dense_equiv = sum(getattr(m, "in_features", 0) * getattr(m, "out_features", 0)
                      for m in model.modules() if type(m).__name__ == "SparseLinear")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (batch, seq + 1), generator=g)
    try:  # reset the peak RSS so it covers the training steps only (Linux: 5 > clear_refs)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step allocates Adam's state
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "params": params, "sparse_layers_dense_params": dense_equiv,
            "step_ms": 1e3 * statistics.median(times), "peak_mb": _rss_mb("VmHWM:") - base,
            "baseline_mb": base, "loss": loss.item()}


def transformer_main(args) -> dict:
    cmd = [sys.executable, __file__, "--transformer", "--threads", str(args.threads), "--tsteps", str(args.tsteps)]
    runs = {"dense": [], "sparse": []}
    for _ in range(2):  # dense, sparse, dense, sparse: each in a fresh process (clean peak memory)
        for kind in ("dense", "sparse"):
            proc = subprocess.run(cmd + ["--worker", kind], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = {k: min(v, key=lambda r: r["step_ms"]) for k, v in runs.items()}
    peak = {k: min(r["peak_mb"] for r in v) for k, v in runs.items()}
    print(f"# transformer: d=512, 10 blocks (q/k/v/o + 4x MLP at 90% sparsity, SparseLinear), vocab 8192, "
          f"batch 4 x 64 tokens, Adam; {args.tsteps} steps per process, 2 processes each")
    print(f"{'model':<8} {'params':>10} {'step ms':>9} {'peak MB':>9}")
    for k in ("dense", "sparse"):
        print(f"{k:<8} {best[k]['params']:>10,} {best[k]['step_ms']:>9.0f} {peak[k]:>9.0f}")
    print(f"sparse/dense: step time {best['sparse']['step_ms'] / best['dense']['step_ms']:.2f}, "
          f"peak memory {peak['sparse'] / peak['dense']:.2f} (peak RSS during training minus RSS before the model)")
    return {"runs": runs, "step_ratio": best["sparse"]["step_ms"] / best["dense"]["step_ms"],
            "memory_ratio": peak["sparse"] / peak["dense"]}


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
    ap.add_argument("--tsteps", type=int, default=3, help="--transformer: timed steps per process")
    ap.add_argument("--worker", choices=["sparsetorch", "sparselab", "dense", "sparse"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_training_speed.json"))
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.transformer and args.worker:
        print(json.dumps(transformer_worker(args.worker, args.threads, args.tsteps, 512, 10, 4, 64)))
        return 0
    if args.transformer:
        command = "python benchmarks/bench_training_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{_cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads"
        load = os.getloadavg()[0]
        print(f"# command: {command.strip()}\n# machine: {machine}\n# date: {date}\n# load average: {load:.1f}")
        result = {"command": command.strip(), "machine": machine, "date": date, "load": load, **transformer_main(args)}
        out = Path(args.out).with_name("bench_training_transformer.json")
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
