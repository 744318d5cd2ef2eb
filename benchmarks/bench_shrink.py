"""Speed of a ResNet-style CNN with 50% of its channels removed by sparsetorch.shrink vs the original.

Run:  python benchmarks/bench_shrink.py [--quick]
Prints a table (median latency per batch, interleaved original/shrunk runs, the ratio) with the
command, machine and date, and writes benchmarks/results/bench_shrink.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsetorch
from sparsetorch.models import ResNet
from sparsetorch.shrink import prune_channels, shrink

TARGET = 1.8


def timed(model, x, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - start) / iters


@torch.inference_mode()
def compare(original, small, batch: int, size: int, rounds: int) -> dict:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    iters = max(1, 16 // batch)
    for m in (original, small):  # warm-up: allocator, oneDNN primitive caches
        timed(m, x, iters)
    a, b = [], []
    for _ in range(rounds):  # interleaved so that load from other processes hits both alike
        a.append(timed(original, x, iters))
        b.append(timed(small, x, iters))
    ratios = [x / y for x, y in zip(a, b)]
    return {"batch": batch, "original_ms": statistics.median(a) * 1e3, "shrunk_ms": statistics.median(b) * 1e3,
            "speedup": statistics.median(ratios), "rounds": rounds, "iters_per_round": iters}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32, CIFAR-like)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads than free cores "
                             "make both models spin-wait and hide the difference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = ResNet(widths=(64, 128, 256), blocks=2).eval()
    x = torch.randn(1, 3, args.size, args.size)
    masked = ResNet(widths=(64, 128, 256), blocks=2).eval()
    masked.load_state_dict(original.state_dict())
    prune_channels(masked, 0.5, scope="layer", example_inputs=x)
    small = shrink(masked, x)
    with torch.inference_mode():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)
    full, cut = sparsetorch.report(original, x).total, sparsetorch.report(small, x).total
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    rows = [compare(original, small, b, args.size, 5 if args.quick else 15) for b in (1, 32)]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: {command}\nmachine: {machine}\ndate:    {date}")
    print(f"ResNet(widths=(64,128,256), blocks=2), {args.size}x{args.size} input, 50% of channels per group removed")
    print(f"params  {n_params(original):>12,} -> {n_params(small):>12,}  ({n_params(small) / n_params(original):.1%})")
    print(f"MFLOPs  {full.dense_flops / 1e6:>12,.1f} -> {cut.dense_flops / 1e6:>12,.1f}  "
          f"({cut.dense_flops / full.dense_flops:.1%}, per sample, sparsetorch.report)")
    print(f"{'batch':>5}  {'original ms':>11}  {'shrunk ms':>9}  {'speedup':>7}  target {TARGET}x")
    for r in rows:
        ok = "ok" if r["speedup"] >= TARGET else "BELOW TARGET"
        print(f"{r['batch']:>5}  {r['original_ms']:>11.2f}  {r['shrunk_ms']:>9.2f}  {r['speedup']:>6.2f}x  {ok}")
    out = Path(__file__).parent / "results" / ("bench_shrink_quick.json" if args.quick else "bench_shrink.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "machine": machine, "date": date, "model": "ResNet(widths=(64,128,256), blocks=2)",
        "input": [3, args.size, args.size], "params": [n_params(original), n_params(small)],
        "flops_per_sample": [full.dense_flops, cut.dense_flops], "rows": rows, "target_speedup": TARGET,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
