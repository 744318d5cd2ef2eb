"""Layer-level sparse Linear speed: sparsetorch's compiled kernels vs dense torch fp32 vs torch CSR/BSR.

    nice .venv/bin/python benchmarks/bench_kernels.py            # full grid (an hour on a busy 2-core VM)
    .venv/bin/python benchmarks/bench_kernels.py --quick         # a subsample (a minute)
    ... --shapes 4096x4096 --sparsities 0.7,0.9 --batches 1,64 --threads 2 --out FILE   # any sub-grid

Shapes 4096x4096, 1024x4096, 11008x4096; sparsity 50-99%; batch 1/8/64/256; 1 and 2 threads. Weights rotate
across copies totalling >= 128 MB (DRAM-resident, as in a real model). 1-thread times are the median CPU time
of the calling thread (robust to other jobs on the machine); 2-thread times are the fastest wall time of the
calls (the quietest moment; still sensitive to other jobs).
Prints the speedup table (dense fp32 F.linear / candidate), achieved GB/s at batch 1 against the measured
copy bandwidth, and break-even sparsities; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from sparsetorch.kernels import microbench as bench

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 and 1024x4096, 4 sparsities, batch 1/64")
    ap.add_argument("--shapes", default=None, help="comma list of OUTxIN, e.g. 4096x4096,1024x4096")
    ap.add_argument("--sparsities", default=None, help="comma list, e.g. 0.5,0.9,0.99")
    ap.add_argument("--batches", default=None, help="comma list, e.g. 1,64")
    ap.add_argument("--threads", default=None, help="comma list, default 1,2 (quick: 1)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_kernels[_quick].json)")
    args = ap.parse_args(argv)
    if args.quick:
        shapes, sps, batches, threads, reps = [(4096, 4096), (1024, 4096)], [0.5, 0.7, 0.9, 0.99], [1, 64], [1], 7
    else:
        shapes = [(4096, 4096), (1024, 4096), (11008, 4096)]
        sps, batches, threads, reps = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99], [1, 8, 64, 256], [1, 2], 7
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes.split(",")]
    if args.sparsities:
        sps = [float(v) for v in args.sparsities.split(",")]
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.threads:
        threads = [int(t) for t in args.threads.split(",")]
    reps = args.reps or reps
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {command}\n# {bench.machine()}\n# {when}; load average before: {os.getloadavg()[0]:.2f}")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads[0])
    bw = bench.copy_bandwidth()
    torch.set_num_threads(saved)
    print(f"# measured bandwidth (256 MB, {threads[0]} thread(s)): copy {bw['copy_gbs']:.1f} GB/s "
          f"(read+write), read-only sum {bw['read_gbs']:.1f} GB/s (best of 5, shared machine)")
    result = bench.run(shapes, sps, batches, threads, reps=reps)
    load_after = os.getloadavg()[0]
    print(f"\nSpeedup vs dense fp32 F.linear (x); dense rows give its time in ms. Load average after: {load_after:.2f}"
          " (the CPU is shared with other jobs; 2-thread numbers suffer most).")
    print(bench.format_table(result))
    print("\nAchieved GB/s at batch 1 (representation bytes / time) vs copy bandwidth "
          f"{bw['copy_gbs']:.1f} GB/s:")
    for r in result["rows"]:
        if r["batch"] == 1 and r["sparsity"] in (0.5, 0.9, 0.99):
            print(f"  {r['out']}x{r['in']} s={r['sparsity']:.2f} t={r['threads']} {r['kernel']:<12} "
                  f"{r['gbs']:6.1f} GB/s  ({r['ms']:.3f} ms, {r['bytes'] / 1e6:.1f} MB)")
    out = Path(args.out) if args.out else ROOT / "results" / f"bench_kernels{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": bench.machine(), "date": when, "bandwidth": bw,
                               "load_after": load_after, **result}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
