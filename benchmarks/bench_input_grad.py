"""The input gradient dX = dY W of a SparseLinear two ways: gather over a transposed index map (W read by
columns; what layers at most TRANSPOSED_MAP_MAX_DENSITY dense use) and scatter over W's CSR rows (the rest; no
extra index memory). Same layer, same dY, times interleaved, best of --rounds, compiled kernels only.

    nice .venv/bin/python benchmarks/bench_input_grad.py --threads 1

Writes benchmarks/results/bench_input_grad.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sparsetorch.kernels import training_ops
from sparsetorch.sparse_training import SparseLinear
from sparsetorch.sparse_training.sparse_linear import TRANSPOSED_MAP_MAX_DENSITY, transposed_map


def best_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        training_ops.release(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_input_grad.json"))
    a = p.parse_args()
    if not training_ops.available():
        sys.exit("needs the compiled training kernels (pip install -e . builds them)")
    torch.set_num_threads(a.threads)
    meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(), "threads": a.threads,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load": os.getloadavg()[0]}
    print(f"{meta['command']}\n{meta['machine']}, {a.threads} threads, {meta['date']}, load {meta['load']:.1f}")
    print(f"{a.size}x{a.size} layer, dY [{a.batch}, {a.size}]; layers at most {TRANSPOSED_MAP_MAX_DENSITY:.0%} "
          "dense use the gather\n\nsparsity  gather ms  scatter ms  scatter/gather  map MB")
    rows = []
    for s in (float(x) for x in a.sparsities.split(",")):
        layer = SparseLinear(a.size, a.size, s, generator=torch.Generator().manual_seed(0))
        # the map, built even where the layer itself does not keep one
        t_indptr, t_indices, t_perm = transposed_map(layer.indptr, layer.indices, a.size, a.size)
        values = layer.values.detach()
        dyt = training_ops.pack(torch.randn(a.batch, a.size), training_ops.panel_width(a.batch))
        gather = lambda: training_ops.spmm(a.size, t_indptr, t_indices, t_perm, values, dyt)  # noqa: E731
        scatter = lambda: training_ops.spmm_t(a.size, layer.indptr, layer.indices, values, dyt)  # noqa: E731
        torch.testing.assert_close(gather(), scatter(), rtol=1e-4, atol=1e-4)
        g = s_ = float("inf")
        for _ in range(3):  # interleaved rounds, so load bursts hit both
            g, s_ = min(g, best_ms(gather, a.rounds // 3)), min(s_, best_ms(scatter, a.rounds // 3))
        mb = (t_indices.numel() * 2 + t_perm.numel() * 4 + t_indptr.numel() * 8) / 2**20
        rows.append({"sparsity": s, "gather_ms": g, "scatter_ms": s_, "ratio": s_ / g, "map_mb": mb})
        print(f"{s:8.2f}  {g:9.2f}  {s_:10.2f}  {s_ / g:14.2f}  {mb:6.1f}")
    out = Path(a.out)
    out.write_text(json.dumps({**meta, "size": a.size, "batch": a.batch, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
