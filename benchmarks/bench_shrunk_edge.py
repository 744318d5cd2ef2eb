"""Shrunk byte GPTs in the torch-free edge runtime: file size and speed of each cut vs the unshrunk model.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_shrunk_edge.py [--quick]

The byte-level GPT (models.gpt.GPT default config: 4 layers, width 128, 4 heads, context 128; random weights:
speed does not depend on the values) is cut by ``sparsetorch.shrink`` with 8 calibration windows of the Python
stdlib's sources: one block of four (depth), one head of four per block, a quarter of the MLP neurons, a
quarter of the hidden size, and heads + MLP + hidden together with per-block widths. Each model is exported
with ``sparsetorch.export_edge`` (fp32) and run by ``sparsetorch.edge`` in this process with one thread:
greedy ``generate`` (16 prompt bytes + 64 new, KV cache) and a batch-16 x 128 prefill, the fastest of ``--reps``
(the machine is shared: the minimum is the least disturbed run).
Checked per model: max |edge - torch| logits and that greedy text equals the torch model's. Writes
benchmarks/results/bench_shrunk_edge.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.data.text import load_stdlib_text, random_windows
from sparsetorch.export.edge_gpt import torch_generate
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.shrink import remove_blocks, remove_heads, remove_hidden, remove_mlp_channels

ROOT = Path(__file__).resolve().parent
PROMPT, NEW = bytes(range(65, 81)), 64


def variants(calib: list[torch.Tensor]) -> dict:
    def depth(m):
        return remove_blocks(m, 1, calib)

    def heads(m):
        return remove_heads(m, 1, calib)

    def mlp(m):
        return remove_mlp_channels(m, 0.25, calib)

    def hidden(m):
        return remove_hidden(m, 0.25, calib)

    def per_block(m):
        remove_heads(m, 1, calib, per_layer=True)
        remove_mlp_channels(m, 0.25, calib, per_layer=True)
        return remove_hidden(m, 0.25, calib)

    return {"unshrunk": lambda m: m, "depth -1 of 4 blocks": depth, "heads -1 of 4": heads, "MLP -25%": mlp,
            "hidden -25%": hidden, "heads+MLP+hidden per block": per_block}


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(model: GPT, path: Path, batch: np.ndarray, reps: int) -> dict:
    desc = sparsetorch.export_edge(model, torch.from_numpy(batch[:1, :8]), path)
    runtime = edge.load(path)
    with torch.no_grad():
        want = model(torch.from_numpy(batch[:2])).numpy()
    text = runtime.generate(PROMPT, NEW)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "heads": [b.attn.heads for b in model.blocks], "mlp": [b.mlp.fc.out_features for b in model.blocks],
        "width": int(model.tok.weight.shape[1]), "format_version": desc["version"],
        "spt_bytes": path.stat().st_size,
        "max_abs_logit_error": float(np.abs(runtime(batch[:2]) - want).max()),
        "greedy_equals_torch": text == torch_generate(model, PROMPT, NEW),
        "generate_s": best_seconds(lambda: runtime.generate(PROMPT, NEW), reps),
        "prefill16_s": best_seconds(lambda: runtime(batch), reps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition (a smoke run)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_shrunk_edge.json"))
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    split = load_stdlib_text(max_bytes=400_000)
    calib = list(random_windows(split.train, 8, 128, torch.Generator().manual_seed(0)))
    batch = random_windows(split.val, 16, 128, torch.Generator().manual_seed(1)).numpy()
    torch.manual_seed(0)
    base = GPT(GPTConfig()).eval()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cut) in enumerate(variants(calib).items()):
            rows[name] = measure(cut(copy.deepcopy(base)).eval(), Path(tmp) / f"m{i}.spt", batch, reps)
    command = "OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_shrunk_edge.py" + (" --quick" if args.quick else "")
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"command: {command}\nmachine: {machine}, 1 thread\ndate: {started:%Y-%m-%d %H:%M UTC}\n")
    ref = rows["unshrunk"]
    print(f"{'model':<28}{'params':>9}{'x':>6}{'.spt KiB':>10}{'x':>6}{'greedy tok/s':>14}{'x':>6}"
          f"{'prefill 16x128 ms':>19}{'x':>6}{'max|edge-torch|':>17}{'text=torch':>11}")
    for name, r in rows.items():
        print(f"{name:<28}{r['params']:>9}{r['params'] / ref['params']:>6.2f}{r['spt_bytes'] / 1024:>10.1f}"
              f"{r['spt_bytes'] / ref['spt_bytes']:>6.2f}{NEW / r['generate_s']:>14.1f}"
              f"{ref['generate_s'] / r['generate_s']:>6.2f}{r['prefill16_s'] * 1e3:>19.1f}"
              f"{ref['prefill16_s'] / r['prefill16_s']:>6.2f}{r['max_abs_logit_error']:>17.2e}"
              f"{str(r['greedy_equals_torch']):>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"command": command, "machine": machine, "date": started.isoformat(), "rows": rows}, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
