"""Per-token overhead of ``generate()``: eager against ``torch.compile`` (``compile_decode``), dense and converted.

A Llama-architecture model from a config (default: 22 layers as TinyLlama, but tiny widths, so the weights
cost almost nothing and what is timed is the per-token Python and framework overhead: module calls, RoPE,
RMSNorm, SDPA, the KV cache), every block Linear 70% pruned by magnitude per row (lm_head dense). Variants:
the dense model and ``to_inference`` with each ``--values``, each eager (dynamic cache, as ``generate``
runs by default) and through ``sparsetorch.inference.compile_decode`` (static cache, decode step compiled, prefill
eager). Per token: a stopping criterion records the process CPU time and the wall time at every step; the
median step after the first two is taken, and the variants are timed alternately ``--rounds`` times
(medians reported; on a shared machine the CPU time is the reliable figure). Also: the first compiled
``generate``'s wall and CPU time (compile included; inductor's worker processes count once they exit) and
whether its greedy tokens equal the eager model's (the script fails if not).

    OMP_NUM_THREADS=1 python benchmarks/bench_compile_decode.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/bench_compile_decode.py --threads 2

Results go to benchmarks/results/compile_decode_<threads>t.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import sparsetorch
from bench_decode import step_clock
from sparsetorch.inference import compile_decode


def build(layers: int, hidden: int, intermediate: int, sparsity: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                w = mod.weight
                k = int(w.shape[1] * sparsity)
                w.mul_(w.abs() > w.abs().kthvalue(k, dim=1, keepdim=True).values)
    return model


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (inductor compiles in worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def step_times(model, ids, new: int) -> tuple[list[float], list[float], torch.Tensor]:
    """CPU and wall seconds of each decode step after the first two, and the generated tokens."""
    from transformers import StoppingCriteriaList

    clock = step_clock(time.process_time, time.perf_counter)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, eos_token_id=None, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]))
    diff = lambda t: [b - a for a, b in zip(t[2:], t[3:])]  # noqa: E731
    cpu, wall = clock.times
    return diff(cpu), diff(wall), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--values", default="fp32,int8")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=34)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dense = build(args.layers, args.hidden, args.intermediate, args.sparsity)
    ids = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    models = {"dense": dense}
    kernels = {}
    for values in args.values.split(","):
        t0 = time.perf_counter()
        models[values] = sparsetorch.to_inference(dense, (ids,), values=values, budget_s=0.05)
        kernels[values] = sorted({row["kernel"] for row in models[values].sparsetorch_plan})
        print(f"to_inference values={values}: {time.perf_counter() - t0:.1f} s, kernels {kernels[values]}")
    variants, compile_s, same = {}, {}, {}
    for name, model in models.items():
        variants[f"{name} eager"] = model
        compiled = compile_decode(copy.deepcopy(model), fullgraph=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        *_, tokens = step_times(compiled, ids, args.new_tokens)
        compile_s[name] = {"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0}
        same[name] = bool(torch.equal(tokens, step_times(model, ids, args.new_tokens)[2]))
        variants[f"{name} compiled"] = compiled
        print(f"{name}: first compiled generate {compile_s[name]['wall']:.1f} s wall, {compile_s[name]['cpu']:.1f} s CPU "
              f"(with compile workers), greedy tokens equal eager: {same[name]}")
    cpu = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    for _ in range(args.rounds):  # alternate, so a busy spell on the shared machine hits every variant
        for name, model in variants.items():
            c, w, _ = step_times(model, ids, args.new_tokens)
            cpu[name].append(statistics.median(c) * 1e3)
            wall[name].append(statistics.median(w) * 1e3)
    base = statistics.median(wall["dense eager"])
    print(f"\n{args.layers} layers x {args.hidden} (intermediate {args.intermediate}), {args.sparsity:.0%} pruned, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, {dt.date.today()}")
    print(f"{'variant':<20} {'CPU ms/token':>13} {'wall ms/token':>14} {'wall vs dense eager':>20}")
    rows = {}
    for name in variants:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        rows[name] = {"cpu_ms_per_token": c, "wall_ms_per_token": w, "cpu_rounds": cpu[name], "wall_rounds": wall[name]}
        print(f"{name:<20} {c:>13.2f} {w:>14.2f} {base / w:>19.2f}x")
    out = Path(__file__).parent / "results" / f"compile_decode_{args.threads}t.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": str(dt.date.today()), "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "args": vars(args), "kernels": kernels,
                               "first_compiled_generate_s": compile_s, "tokens_equal_eager": same, "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    if not all(same.values()):
        raise SystemExit(f"compiled greedy tokens differ from eager: {same}")


if __name__ == "__main__":
    main()
