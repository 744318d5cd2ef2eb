"""Compiled decode with transformers' sdpa attention vs sparsetorch's packed grouped-query attention, same model.

    .venv/bin/python benchmarks/bench_gqa_attention.py                       # 1B preset, 70% int8, ~10 minutes
    .venv/bin/python benchmarks/bench_gqa_attention.py --values fp32 --sparsity 0.5

One converted model (bench_decode's 1B Llama preset: 32 query heads over 4 key/value heads), its decode step
compiled with each attention in turn, alternating for --rounds rounds; per round the median of two timed
generates (--new-tokens after a --prompt-token prompt). Prints ms per token and whether the greedy tokens agree.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_decode as bd  # noqa: E402

import sparsetorch  # noqa: E402
from sparsetorch.inference import compile_decode  # noqa: E402
from sparsetorch.inference.gqa_attention import ATTENTION  # noqa: E402
from sparsetorch.kernels.microbench import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b", choices=sorted(bd.PRESETS))
    ap.add_argument("--sparsity", default="0.7")
    ap.add_argument("--values", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results file (default results/gqa_attention_PRESET.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sp = args.sparsity if args.sparsity == "2:4" else float(args.sparsity)
    model = bd.build(args.preset)
    bd.prune(model, sp)
    ids = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    fast = sparsetorch.to_inference(model, (ids,), values=args.values)
    del model
    bd.release_memory()
    times, tokens = {"sdpa": [], ATTENTION: []}, {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for impl in times:
                torch._dynamo.reset()
                compiled = compile_decode(fast)  # switches to ATTENTION; set the one to time after it
                compiled.set_attn_implementation(impl)
                tokens[impl] = bd.timed_generate(compiled, ids, args.new_tokens)[0][0].tolist()  # compiles
                runs = [bd.timed_generate(compiled, ids, args.new_tokens)[1] for _ in range(2)]
                times[impl].append(statistics.median(runs) / (args.new_tokens - 1) * 1e3)
                print(f"{impl}: {times[impl][-1]:.2f} ms/token", flush=True)
    agree = sum(a == b for a, b in zip(tokens["sdpa"], tokens[ATTENTION])) / len(tokens["sdpa"])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n# python benchmarks/bench_gqa_attention.py {' '.join(sys.argv[1:])}\n# {machine()}, {args.threads} threads, {when}")
    print(f"{args.preset} {args.sparsity} {args.values}, compiled decode, ms per token (each round):")
    for impl, ts in times.items():
        print(f"  {impl:18s} " + "  ".join(f"{t:.2f}" for t in ts))
    print(f"  ratio sdpa / {ATTENTION}: {statistics.median(times['sdpa']) / statistics.median(times[ATTENTION]):.3f}x;"
          f" greedy tokens agree {agree:.2f}")
    out = args.out or Path(__file__).parent / "results" / f"gqa_attention_{args.preset}.json"
    out.write_text(json.dumps({"command": "python benchmarks/bench_gqa_attention.py " + " ".join(sys.argv[1:]),
                               "machine": machine(), "date": when, "args": {k: str(v) for k, v in vars(args).items()}, "ms_per_token": times,
                               "token_agreement": agree}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
