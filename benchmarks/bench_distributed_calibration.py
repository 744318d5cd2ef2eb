"""Distributed calibration: ``prune_oneshot`` under torchrun with 2 processes (each on half of the calibration
set, statistics all-reduced over gloo) against 1 process on the whole set, on the same data.

A Llama-architecture model built from a config (random weights, nothing downloaded) is pruned with each
method by 1 process (the baseline), by the same process on the items in reverse order (the method's own
float noise: the same sums in another order) and by 2 processes (``--runs`` adds 1 process x 2 threads).
Per run: seconds inside ``prune_oneshot`` (the slowest rank), split into the layer solves (replicated on
every rank: they do not get faster) and the rest (block forwards, statistics, all-reduces: what the ranks
share), the whole command's wall time (process start and imports included); whether both ranks hold
bitwise identical masks and weights; how many mask entries differ from the baseline's; and the largest
difference of a weight both keep, relative to its tensor's max|W| (SparseGPT's updates).

    OMP_NUM_THREADS=1 PYTHONPATH=src nice .venv/bin/python benchmarks/bench_distributed_calibration.py
    ... --layers 8 --width 512 --samples 128 --seq 256       # a larger run

Writes benchmarks/results/bench_distributed_calibration.{json,txt}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# (processes, threads per process, items reversed); the first is the baseline. One process on the items in
# reverse order measures the float noise of the method itself: what summing in another order changes.
RUNS = {"1 x 1": (1, 1, False), "1 x 1 rev": (1, 1, True), "2 x 1": (2, 1, False), "1 x 2": (1, 2, False)}
DEFAULT_RUNS = "1 x 1,1 x 1 rev,2 x 1"


def build_model(args):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                        num_attention_heads=max(1, args.width // 64), num_key_value_heads=max(1, args.width // 128),
                        vocab_size=256, max_position_embeddings=args.seq, pad_token_id=0, bos_token_id=0,
                        eos_token_id=0)
    return T.LlamaForCausalLM(cfg).eval()


def calibration(args) -> list[torch.Tensor]:
    from sparsetorch.data.text import load_stdlib_text, random_windows

    text = load_stdlib_text(max_bytes=2_000_000).train
    windows = random_windows(text, args.samples, args.seq, torch.Generator().manual_seed(1))  # [samples, seq]
    return list(windows[:, None, :])  # items [1, seq]


def worker(args) -> None:
    """One rank: prune a fresh model with each method on this rank's shard; save tensors and timings."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    import sparsetorch
    from sparsetorch.oneshot import prune_oneshot, shard_calibration

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    items = calibration(args)
    items = shard_calibration(items[::-1] if args.reverse else items)
    prune_oneshot(build_model(args), items[:1], method="wanda", device="cpu", progress=False)  # warm-up, not timed
    report, tensors = {}, {}
    for method in args.methods.split(","):
        model = build_model(args)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        prune_oneshot(model, items, method=method, sparsity=0.5, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
        stats = model.sparsetorch_stats
        solve = sum(r.seconds for r in stats.layers)
        report[method] = {"seconds": seconds, "solve": solve, "tokens": sum(int(i.numel()) for i in items),
                          "from_rank0": stats.from_rank0, "world_size": stats.world_size}
        tensors |= {f"{method}/state/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        tensors |= {f"{method}/mask/{m.qualified_name}": m.mask.clone() for m in sparsetorch.iter_masks(model)}
    save_file(tensors, os.path.join(args.out, f"rank{rank}.safetensors"))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


def launch(args, procs: int, threads: int, reverse: bool, out: Path) -> float:
    exe = Path(sys.executable).with_name("torchrun")
    run = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*run, "--standalone", f"--nproc_per_node={procs}", __file__, "--worker", "--out", str(out),
           "--threads", str(threads), "--layers", str(args.layers), "--width", str(args.width),
           "--samples", str(args.samples), "--seq", str(args.seq), "--methods", args.methods,
           *(["--reverse"] if reverse else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def compare(a: dict, b: dict, method: str) -> tuple[int, int, float]:
    """One method's tensors ``a`` against the baseline ``b``: (mask entries that differ, mask entries, largest
    difference of a weight both keep, relative to its tensor's max|W|)."""
    keys = [k for k in b if k.startswith(f"{method}/mask/")]
    flips = sum(int((a[k] != b[k]).sum()) for k in keys)
    total = sum(b[k].numel() for k in keys)
    worst = 0.0
    for k in keys:
        w = k.replace("/mask/", "/state/", 1)  # masks are named like the parameter they mask
        both = a[k] & b[k]
        diff = float(((a[w] - b[w]).abs() * both).max()) / (float(b[w].abs().max()) or 1.0)
        worst = max(worst, diff)
    return flips, total, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (split over the ranks)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, from {list(RUNS)}; the first is the "
                   "baseline (1 x 2 is meaningless on a machine whose cores are busy: its threads spin-wait)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from safetensors.torch import load_file

    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_before": os.getloadavg(),
            "model": f"Llama {args.layers} layers x {args.width}, random weights", "calibration":
            f"{args.samples} x {args.seq} stdlib bytes", "sparsity": 0.5}
    runs = {name: RUNS[name] for name in args.runs.split(",")}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (procs, threads, reverse) in runs.items():
            out = Path(tmp, name.replace(" ", "_"))
            out.mkdir()
            wall = launch(args, procs, threads, reverse, out)
            reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
            results[name] = (wall, reports, [load_file(out / f"rank{r}.safetensors") for r in range(procs)])
        base_name = next(iter(runs))
        base = results[base_name][2][0]
        for name, (wall, reports, tensors) in results.items():
            procs, threads, reverse = runs[name]
            for method in args.methods.split(","):
                seconds = max(r[method]["seconds"] for r in reports)
                solve = max(r[method]["solve"] for r in reports)
                ranks_equal = all(torch.equal(tensors[0][k], t[k]) for t in tensors[1:] for k in tensors[0]
                                  if k.startswith(f"{method}/"))
                flips, entries, worst = compare(tensors[0], base, method)
                rows.append({"run": name, "method": method, "processes": procs, "threads": threads,
                             "items_reversed": reverse, "prune_seconds": seconds, "solve_seconds": solve,
                             "shared_seconds": seconds - solve, "wall_seconds": wall,
                             "tokens_per_rank": [r[method]["tokens"] for r in reports], "ranks_identical": ranks_equal,
                             "mask_entries_differing": flips, "mask_entries": entries,
                             "max_rel_kept_weight_diff": worst, "from_rank0": reports[0][method]["from_rank0"]})
    header = (f"{meta['command']}\n{meta['machine']}, {meta['cpus']} cpus, torch {meta['torch']}, {meta['date']}, "
              f"load average {' '.join(f'{x:.2f}' for x in meta['load_before'])}\n{meta['model']}, calibration "
              f"{meta['calibration']}, 50% unstructured. Baseline (speed-up, masks, weights): {base_name}; "
              "'rev' = the items in reverse order (the float noise of summing in another order)\n")
    lines = [header, f"{'method':<10} {'run':<10} {'prune s':>8} {'solve s':>8} {'rest s':>7} {'wall s':>7} "
             f"{'speed-up':>8} {'ranks equal':>11} {'mask entries != base':>21} {'max rel dW kept':>15}"]
    for row in rows:
        ref = next(r for r in rows if r["method"] == row["method"] and r["run"] == base_name)
        flips = f"{row['mask_entries_differing']} / {row['mask_entries']}"
        lines.append(f"{row['method']:<10} {row['run']:<10} {row['prune_seconds']:>8.2f} {row['solve_seconds']:>8.2f} "
                     f"{row['shared_seconds']:>7.2f} {row['wall_seconds']:>7.1f} "
                     f"{ref['prune_seconds'] / row['prune_seconds']:>7.2f}x {str(row['ranks_identical']):>11} "
                     f"{flips:>21} {row['max_rel_kept_weight_diff']:>15.1e}")
    text = "\n".join(lines)
    print(text)
    out = HERE / "results" / "bench_distributed_calibration"
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
