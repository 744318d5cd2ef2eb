"""End-to-end inference speed of 90%-pruned models: ``sparsetorch.to_inference`` vs the dense model.

    flock /work/notes/bench.lock nice .venv/bin/python benchmarks/bench_inference_model.py --threads 1
    flock /work/notes/bench.lock nice .venv/bin/python benchmarks/bench_inference_model.py --threads 2 \
        --gpt-batches 1,16 --out bench_inference_model_2threads

Models:
* the digits MLP (models.MLP 64-256-256-10, trained, globally magnitude-pruned to 90%, fine-tuned with its
  masks); its three layers are one chain fc1 -> relu -> fc2 -> relu -> classifier;
* a wide MLP (64-4096-4096-10, random weights pruned to 90%), where the kernels themselves pay;
* the byte-level GPT (models.gpt, GPTConfig defaults: 4 layers, width 128; the one-shot benchmark's cached
  checkpoint when present, else random weights), attention and MLP Linears magnitude-pruned to 90%
  unstructured (lm_head dense), on prompts of 64 tokens (batch 1 = latency of a 64-token forward).

For each batch the model is converted twice with example inputs of that batch: ``fuse=False`` (every layer
on its own measured kernel) and the default (runs of layers fused into one native call where that measured
faster). Dense, per-layer and fused models then run interleaved, call by call; median per call.
1 thread: CPU time of the calling thread (robust to other jobs on a shared machine); 2 threads: wall time.
For the GPT, "rest" is the time of the dense model with its pruned Linears replaced by free stand-ins:
what no sparse kernel can speed up (attention, LayerNorms, embeddings, lm_head).
Prints the table with ratios and writes JSON + TXT to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import sparsetorch
from sparsetorch.data.digits import load_digits_split
from sparsetorch.kernels import microbench as bench
from sparsetorch.models import MLP
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.recipes.training_loop import accuracy, fit

ROOT = Path(__file__).resolve().parent
TOKENS = 64


def prune90(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(model, 0.9, generator=torch.Generator().manual_seed(0))
    return model


def digits_model() -> tuple[torch.nn.Module, float, float]:
    data = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = fit(MLP((64, 256, 256, 10)), data.x_train, data.y_train, epochs=20)
    dense_acc = accuracy(model, data.x_test, data.y_test)
    prune90(model)
    fit(model, data.x_train, data.y_train, epochs=10)  # masks keep pruned weights at zero while fine-tuning
    return model, dense_acc, accuracy(model, data.x_test, data.y_test)


def wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return prune90(MLP((64, 4096, 4096, 10)))


def gpt_model() -> tuple[torch.nn.Module, str]:
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    path = ROOT / "cache" / f"gpt_byte_{cfg.layers}x{cfg.width}_steps500_seed0.pt"
    source = "random weights"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        source = f"trained checkpoint {path.relative_to(ROOT.parent)}"
    return prune90(model.eval()), source


class _Skip(torch.nn.Module):
    """Stands in for a pruned Linear at (almost) no cost: zeros of the right shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_sparse_linears(dense: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """dense with every pruned Linear of model replaced by _Skip: what stays dense costs this much (Amdahl)."""
    rest = copy.deepcopy(dense)
    for masked in sparsetorch.iter_masks(model):
        parent, _, attr = masked.fqn.rpartition(".")
        target = rest.get_submodule(parent) if parent else rest
        setattr(target, attr, _Skip(getattr(target, attr).out_features))
    return rest


def time_models(models: dict, x, reps: int, cpu_time: bool) -> dict[str, float]:
    """Median seconds per call of each model, interleaved call by call."""
    clock = time.thread_time if cpu_time else time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(3):
            for m in models.values():
                m(x)
        for _ in range(reps):
            for k, m in models.items():
                t0 = clock()
                m(x)
                samples[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def kernels_of(plan: list[dict]) -> str:
    """Compact per-layer choice: each layer's kernel (or the chain it runs in) and each chain's verdict."""
    layers = [r for r in plan if r["type"] != "FusedChain"]
    chains = [r for r in plan if r["type"] == "FusedChain"]
    if len(layers) > 6:  # the GPT: counts
        count = collections.Counter("in chain" if r.get("fused_into") else r["kernel"] for r in layers)
        text = ", ".join(f"{k} x{v}" for k, v in count.items())
    else:
        text = ",".join(f"{r['layer']}={r['kernel']}" for r in layers if not r.get("fused_into"))
    verdicts = collections.Counter(
        f"{r['kernel']}[{'+'.join(r['formats'])}]" if r["kernel"] != "per-layer" else "per-layer" for r in chains)
    return text + ("; chains: " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in verdicts.items())
                   if chains else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="calls per model at batch 1 (fewer for larger batches)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="digits,wide,gpt")
    ap.add_argument("--gpt-batches", default="1,16,64", help="GPT batches (prompts of 64 tokens each)")
    ap.add_argument("--out", default="bench_inference_model", help="results/<out>.json and .txt")
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"# {command}\n# {bench.machine()}\n# {when}; load average before: {os.getloadavg()[0]:.2f}")
    wanted = args.models.split(",")
    data = load_digits_split(seed=0)
    models, accuracies, inputs = {}, None, {}
    if "digits" in wanted:
        digits, acc_dense, acc_sparse = digits_model()
        models["digits MLP 64-256-256-10"] = digits
        accuracies = (digits, acc_dense, acc_sparse)
    if "wide" in wanted:
        models["wide MLP 64-4096-4096-10"] = wide_model()
    if "gpt" in wanted:
        gpt, source = gpt_model()
        models[f"byte GPT 4x128, {TOKENS} tokens"] = gpt
        say(f"# GPT weights: {source}, 90% unstructured on attention + MLP Linears")
    for name in models:
        if name.startswith("byte GPT"):
            g = torch.Generator().manual_seed(0)
            inputs[name] = {b: torch.randint(0, 256, (b, TOKENS), generator=g)
                            for b in map(int, args.gpt_batches.split(","))}
        else:
            inputs[name] = {b: data.x_test[:b] if b <= len(data.x_test) else torch.rand(b, 64) for b in (1, 64, 256)}
    say(f"{'model':<28} {'thr':>3} {'batch':>5} {'dense ms':>10} {'layers ms':>10} {'fused ms':>10} "
        f"{'layers':>7} {'fused':>7} {'samples/s':>10}  kernels")
    rows = []
    result = {"command": command, "machine": bench.machine(), "date": when, "rows": rows}
    out = ROOT / "results" / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row, so an interrupted run keeps what it measured
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")

    saved = torch.get_num_threads()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, model in models.items():
            dense = copy.deepcopy(model)
            sparsetorch.remove_masks(dense)
            dense.eval()
            for batch, x in inputs[name].items():
                per_layer = sparsetorch.to_inference(model, x, fuse=False)
                fused = sparsetorch.to_inference(model, x)
                reps = args.reps if batch == 1 and not name.startswith("byte GPT") else max(20, args.reps // 5)
                candidates = {"dense": dense, "layers": per_layer, "fused": fused}
                if name.startswith("byte GPT"):
                    candidates["rest"] = without_sparse_linears(dense, model)
                t = time_models(candidates, x, reps, cpu_time=threads == 1)
                kernels = kernels_of(fused.sparsetorch_plan)
                row = {"model": name, "threads": threads, "batch": batch, "dense_ms": t["dense"] * 1e3,
                       "per_layer_ms": t["layers"] * 1e3, "fused_ms": t["fused"] * 1e3,
                       "speedup_per_layer": t["dense"] / t["layers"], "speedup": t["dense"] / t["fused"],
                       "samples_per_s": batch / t["fused"], "kernels": kernels,
                       "plan": [{k: v for k, v in r.items() if k != "skipped"} for r in fused.sparsetorch_plan]}
                if "rest" in t:  # time of attention, LayerNorms, embeddings, lm_head: dense in both models
                    row["dense_rest_ms"] = t["rest"] * 1e3
                    kernels += f"; rest (not pruned) {t['rest'] * 1e3:.3f} ms"
                rows.append(row)
                say(f"{name:<28} {threads:>3} {batch:>5} {t['dense'] * 1e3:>10.3f} {t['layers'] * 1e3:>10.3f} "
                    f"{t['fused'] * 1e3:>10.3f} {row['speedup_per_layer']:>6.2f}x {row['speedup']:>6.2f}x "
                    f"{row['samples_per_s']:>10.0f}  {kernels}")
                write()
    torch.set_num_threads(saved)
    if accuracies:
        digits, acc_dense, acc_sparse = accuracies
        with torch.no_grad():
            conv = sparsetorch.to_inference(digits, data.x_test)(data.x_test).argmax(1).eq(data.y_test).float().mean()
        result["accuracy"] = {"dense": acc_dense, "pruned": acc_sparse, "converted": float(conv)}
        say(f"\ndigits test accuracy: dense {acc_dense:.4f}, 90% pruned + fine-tuned {acc_sparse:.4f}, "
            f"converted {float(conv):.4f}")
    say(f"load average after: {os.getloadavg()[0]:.2f} (shared CPU); 'layers' = to_inference(fuse=False), "
        f"'fused' = to_inference() default; ratios are dense / sparse time")
    write()
    print(f"wrote {out} and {out.with_suffix('.txt').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
