"""Batch-1 decode, one Linear at a time: the layers of bench_decode's 1B Llama preset, each value/sparsity
format against dense torch fp32, and the sum over one token (22 blocks + lm_head).

    .venv/bin/python benchmarks/bench_decode_layers.py                 # 2 threads, ~5 minutes
    .venv/bin/python benchmarks/bench_decode_layers.py --threads 1 --reps 30
    .venv/bin/python benchmarks/bench_decode_layers.py --rows 512 --reps 5   # prefill: a 512-token prompt

Splits a token's time into what the Linears take (here) and what the rest of the model takes (bench_decode's
end-to-end figure minus this sum). Weights are magnitude-pruned random matrices, rotated over copies totalling
>= 256 MB so every call streams them from DRAM as a real model does; candidates are interleaved call by call
(kernels.microbench.time_interleaved: median CPU time at 1 thread, fastest wall time at 2). q/k/v and gate/up
are timed as the one concatenated weight each that to_inference's siblings make of them. GB/s counts the bytes
of the representation; the percentage is of the read rate of a torch sum over 256 MB measured at the start,
which our streaming kernels can exceed (the sum is not the limit, and a shared VM's bandwidth moves).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetorch.kernels import microbench as bench
from sparsetorch.kernels.bitmask_weight import BitmaskWeight, has_int8_activations

# (name, out, in, per token) of the 1B preset (hidden 2048, MLP 5632, 32 heads of 64, 4 kv heads, 22 blocks)
LAYERS = [("qkv", 2048 + 2 * 256, 2048, 22), ("o_proj", 2048, 2048, 22), ("gate_up", 2 * 5632, 2048, 22),
          ("down_proj", 2048, 5632, 22), ("lm_head", 32000, 2048, 1)]
# (name, sparsity or None for dense, values, int8 activations); lm_head stays dense in bench_decode's models
FORMATS = [("dense ours fp32", None, "fp32", False), ("dense ours int8", None, "int8", True),
           ("50% fp32", 0.5, "fp32", False), ("70% fp32", 0.7, "fp32", False), ("70% bf16", 0.7, "bf16", False),
           ("70% int8", 0.7, "int8", True), ("2:4 fp32", "2:4", "fp32", False), ("2:4 int8", "2:4", "int8", True)]


def pruned(w: torch.Tensor, sparsity) -> torch.Tensor:
    """bench_decode.prune's rule: magnitude per row, or the 2 largest of every 4 inputs."""
    if sparsity == "2:4":
        g = w.view(w.shape[0], -1, 4)
        return w * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True).view_as(w)
    k = int(w.shape[1] * sparsity)
    return w * (w.abs() > w.abs().kthvalue(k, dim=1, keepdim=True).values)


def layer_rows(name: str, out: int, inp: int, reps: int, threads: int, min_bytes: int, gen, n_rows: int = 1) -> list[dict]:
    w = torch.randn(out, inp, generator=gen) * 0.02
    x = torch.randn(n_rows, inp, generator=gen)
    weights = {"dense torch fp32": w}
    for fmt, sparsity, values, q8 in FORMATS:
        if q8 and not has_int8_activations():
            continue
        src = w if sparsity is None else pruned(w, sparsity)
        weights[fmt] = BitmaskWeight.from_dense(src, values=values, quantize_input=q8, dense=sparsity is None)
    nbytes = {k: bench._nbytes(v) for k, v in weights.items()}  # a tensor's bytes, or a packed weight's .nbytes
    pools = {k: bench._copies(v, max(1, min(64, math.ceil(min_bytes / nbytes[k])))) for k, v in weights.items()}
    fns = {k: [(lambda c=c: F.linear(x, c)) if isinstance(c, torch.Tensor) else (lambda c=c: c.linear(x))
               for c in pool] for k, pool in pools.items()}
    t = bench.time_interleaved(fns, reps, cpu_time=threads == 1)
    return [{"layer": name, "out": out, "in": inp, "format": k, "ms": s * 1e3, "bytes": nbytes[k],
             "gbs": nbytes[k] / s / 1e9, "x_dense": t["dense torch fp32"] / s} for k, s in t.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--rows", type=int, default=1, help="input rows per call: 1 is decode, 128 or more the prefill path")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_layers_t<threads>.json)")
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(args.threads)
    bw = bench.copy_bandwidth()
    print(f"# {command}\n# {bench.machine()}, {args.threads} thread(s)\n# {when}; read bandwidth {bw['read_gbs']:.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, out, inp, _ in LAYERS:
        rows += layer_rows(name, out, inp, args.reps, args.threads, 256 << 20 if args.rows == 1 else 0, gen, args.rows)
        print(f"  {name} {out}x{inp}: " + ", ".join(f"{r['format']} {r['ms']:.3f} ms" for r in rows if r["layer"] == name),
              flush=True)
    formats = list(dict.fromkeys(r["format"] for r in rows))
    per = "token" if args.rows == 1 else f"{args.rows}-token prompt"
    print("\n| format | " + " | ".join(f"{n} {o}x{i}" for n, o, i, _ in LAYERS) + f" | Linears per {per} |")
    print("|---" * (len(LAYERS) + 2) + "|")
    per_token = {}
    for fmt in formats:
        cells, total = [], 0.0
        for name, _, _, count in LAYERS:
            r = next(r for r in rows if r["layer"] == name and r["format"] == fmt)
            if name == "lm_head" and not fmt.startswith("dense"):  # the models keep lm_head dense: int8 or fp32, ours
                r = next(r for r in rows if r["layer"] == name and r["format"] == f"dense ours {'int8' if 'int8' in fmt else 'fp32'}")
            streamed = f" {r['gbs']:.0f} GB/s ({100 * r['gbs'] / bw['read_gbs']:.0f}%)" if args.rows == 1 else ""  # prefill: compute
            cells.append(f"{r['ms']:.3f} ms {r['x_dense']:.2f}x" + streamed)
            total += r["ms"] * count
        per_token[fmt] = total
        print(f"| {fmt} | " + " | ".join(cells) + f" | {total:.1f} ms |")
    suffix = "" if args.rows == 1 else f"_rows{args.rows}"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"decode_layers_t{args.threads}{suffix}.json"
    out.write_text(json.dumps({"command": command, "machine": bench.machine(), "date": when, "threads": args.threads,
                               "rows_per_call": args.rows, "bandwidth": bw, "rows": rows, "linears_ms_per_token": per_token}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
