"""Batch-1 decode of several models timed in alternating rounds: ratios that a shared machine's drifting
memory bandwidth does not skew.

bench_decode.py times each model once, in a process of its own, minutes apart. On a shared VM the bandwidth a
decode step gets drifts over those minutes: the same 2:4 model on the 1B preset took 116 to 164 ms per token in
six back-to-back runs of one process (2-core AVX2 VM), and dense fp32 torch 3.93 and 4.56 tok/s at the start
and end of one bench_decode run. Here every model lives in a process of its own, built and converted one after
the other, and then all of them stay loaded while the parent asks each in turn for one timed greedy generation
(a round; the order reverses every round). Each model's speed is its median over the rounds, and its ratio to
the first model is the median of the per-round ratios, with their spread. ``--prefill N`` also times one
forward of an N-token prompt per model and round. Models (``--models``, comma-separated):

* ``dense``: the model in fp32 on torch (the reference when first);
* ``dense/int8``, ``dense/fp32``: the dense model through ``to_inference`` with those values (our dense kernels);
* ``torch-int8``: torch's dynamic int8 (``torch.ao.quantization.quantize_dynamic``);
* ``SPARSITY/VALUES`` and ``SPARSITY/VALUES/actA``: pruned as bench_decode.py prunes (``0.7``, ``2:4``; lm_head
  dense), through ``to_inference`` with those values and, with ``actA``, TEAL activation sparsity A calibrated
  on the prompt (``0.7/int8/act0.4``).

    python benchmarks/bench_decode_paired.py --preset 1b --models dense,2:4/fp32 --rounds 5
    python benchmarks/bench_decode_paired.py --preset 1b --models dense/int8,0.7/int8/act0.4,2:4/fp32,dense \
        --pairs 2:4/fp32:dense --rounds 12 --new-tokens 32
    python benchmarks/bench_decode_paired.py --preset 1b --models dense,2:4/fp32 --rounds 8 --new-tokens 16 --prefill 512

Results go to benchmarks/results/decode_paired_<preset>.json (``--out``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_decode as bd  # noqa: E402  (build, prune, timed_generate: the same models as the main table)


def load(spec: str, args, ids) -> torch.nn.Module:
    """The model a --models entry names, ready to generate."""
    import sparsetorch

    model = bd.build(args.preset)
    if spec == "dense":
        return model
    if spec == "torch-int8":
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    parts = spec.split("/")
    if parts[0] != "dense":
        bd.prune(model, parts[0] if parts[0] == "2:4" else float(parts[0]))
    act = None
    if len(parts) == 3:
        act = sparsetorch.inference.calibrate_activation_sparsity(model, ids, sparsity=float(parts[2][3:]))
    fast = sparsetorch.to_inference(model, (ids[:1],), values=parts[1], activation_sparsity=act)
    del model
    bd.release_memory()
    return fast


def worker(conn, spec: str, args) -> None:
    """Builds ``spec``'s model, says "ready", then answers each "run" with (decode tok/s, tokens, prefill tok/s
    or None without --prefill) until "stop"."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    ids = prompt(args)
    model = load(spec, args, ids)
    long = None
    if args.prefill:
        long = torch.randint(0, 32000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    bd.timed_generate(model, ids[:1], 3)  # warm-up: first-call plans and allocations
    if long is not None:
        prefill_tok_s(model, long)  # warm-up: the prefill kernels' first-call choices
    conn.send("ready")
    while conn.recv() == "run":
        out, seconds = bd.timed_generate(model, ids[:1], args.new_tokens)
        prefill = None if long is None else prefill_tok_s(model, long)
        conn.send(((args.new_tokens - 1) / seconds, out[0].tolist(), prefill))


def prefill_tok_s(model, ids: torch.Tensor) -> float:
    """Tokens per second of one forward over the prompt ``ids`` [1, T]."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids)
        return ids.shape[1] / (time.perf_counter() - t0)


def prompt(args) -> torch.Tensor:
    return torch.randint(0, 32000, (8, args.prompt), generator=torch.Generator().manual_seed(0))


def rounds(specs: list[str], args) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[int]]]:
    """Decode and prefill tok/s of every model in every round (prefill empty without --prefill); workers started
    one at a time (conversion peaks do not overlap)."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = {}, []
    try:
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, spec, args), daemon=True)
            proc.start()
            procs.append(proc)
            if parent.recv() != "ready":
                raise RuntimeError(f"worker for {spec} did not start")
            pipes[spec] = parent
            print(f"{spec}: loaded", flush=True)
        speeds: dict[str, list[float]] = {s: [] for s in specs}
        prefill: dict[str, list[float]] = {s: [] for s in specs}
        tokens = {}
        for r in range(args.rounds):
            for spec in specs if r % 2 == 0 else specs[::-1]:
                pipes[spec].send("run")
                tok_s, tokens[spec], prefill_tok_s = pipes[spec].recv()
                speeds[spec].append(tok_s)
                if prefill_tok_s is not None:
                    prefill[spec].append(prefill_tok_s)
            print(f"round {r + 1}: " + ", ".join(f"{s} {speeds[s][-1]:.2f}" for s in specs) + " tok/s", flush=True)
        for pipe in pipes.values():
            pipe.send("stop")
        return speeds, prefill, tokens
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def summary(specs: list[str], speeds: dict[str, list[float]], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per model: median tok/s and the median, min and max of its per-round ratio to the first model; then one
    row per (model, reference) pair of --pairs."""
    rows = []
    for spec, ref in [(s, specs[0]) for s in specs] + pairs:
        ratios = [a / b for a, b in zip(speeds[spec], speeds[ref])]
        rows.append({"model": spec, "versus": ref, "tok_s": speeds[spec], "median_tok_s": statistics.median(speeds[spec]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(bd.PRESETS), default="small")
    ap.add_argument("--models", default="dense,2:4/fp32", help="comma-separated; ratios are to the first")
    ap.add_argument("--pairs", default="", help="more ratios, MODEL:REFERENCE comma-separated "
                    "(e.g. 2:4/fp32:dense; a model named with a colon is split at its last one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=0, help="also time one forward of a prompt this long per round")
    ap.add_argument("--out", help="results file (default: benchmarks/results/decode_paired_<preset>.json)")
    args = ap.parse_args()
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be at least 1 and --new-tokens at least 2")
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    pairs = [tuple(p.strip().rsplit(":", 1)) for p in args.pairs.split(",") if p.strip()]
    if any(len(p) != 2 or not set(p) <= set(specs) for p in pairs):
        ap.error("--pairs takes MODEL:REFERENCE with both in --models")
    bandwidth = bd.copy_bandwidth()
    speeds, prefill, tokens = rounds(specs, args)
    rows = [dict(r, metric="decode") for r in summary(specs, speeds, pairs)]
    if args.prefill:
        rows += [dict(r, metric=f"prefill {args.prefill}") for r in summary(specs, prefill, pairs)]
    print(f"\n{dt.date.today()}  {bd.machine()}  threads={args.threads}  preset={args.preset}  "
          f"torch {torch.__version__}  read bandwidth {bandwidth['read_gbs']:.1f} GB/s")
    print(f"batch-1 decode, {args.new_tokens} new tokens after {args.prompt}"
          + (f", and a {args.prefill}-token prefill" if args.prefill else "")
          + f", {args.rounds} alternating rounds; ratios per round")
    print("| model | metric | tok/s (median) | versus | ratio, median | min - max |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['metric']} | {r['median_tok_s']:.2f} | {r['versus']} | {r['ratio_median']:.2f}x | "
              f"{r['ratio_min']:.2f} - {r['ratio_max']:.2f} |")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"decode_paired_{args.preset}.json"
    out.write_text(json.dumps({"date": str(dt.date.today()), "machine": bd.machine(),
                               "command": "python benchmarks/bench_decode_paired.py " + " ".join(sys.argv[1:]),
                               "args": vars(args), "bandwidth": bandwidth, "rows": rows,
                               "tokens": tokens}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
