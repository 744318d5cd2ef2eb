"""End-to-end inference speed of a 90%-pruned digits MLP: ``sparsetorch.to_inference`` vs the dense model.

    nice .venv/bin/python benchmarks/bench_inference_model.py

Models: the digits MLP (models.MLP 64-256-256-10, trained, globally magnitude-pruned to 90%, fine-tuned with
its masks) and a wide MLP (64-4096-4096-10, random weights pruned to 90%) to show where the kernels pay.
For each batch size the model is converted with example inputs of that batch (so to_inference measures
its kernels at that batch), then dense and converted models run interleaved, call by call; median per call.
1 thread: CPU time of the calling thread (robust to other jobs); 2 threads: wall time.
Prints latency (batch 1) and throughput (batch 64/256) ratios; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
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
from sparsetorch.kernels import bench
from sparsetorch.models import MLP
from sparsetorch.training import accuracy, fit

ROOT = Path(__file__).resolve().parent


def digits_model() -> tuple[torch.nn.Module, float, float]:
    data = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = fit(MLP((64, 256, 256, 10)), data.x_train, data.y_train, epochs=20)
    dense_acc = accuracy(model, data.x_test, data.y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(model, 0.9, generator=torch.Generator().manual_seed(0))
    fit(model, data.x_train, data.y_train, epochs=10)  # masks keep pruned weights at zero while fine-tuning
    return model, dense_acc, accuracy(model, data.x_test, data.y_test)


def wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = MLP((64, 4096, 4096, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(model, 0.9, generator=torch.Generator().manual_seed(0))
    return model


def time_pair(dense, sparse, x, reps: int, cpu_time: bool) -> tuple[float, float]:
    clock = time.thread_time if cpu_time else time.perf_counter
    td, ts = [], []
    with torch.no_grad():
        for _ in range(3):
            dense(x), sparse(x)
        for _ in range(reps):
            for model, acc in ((dense, td), (sparse, ts)):
                t0 = clock()
                model(x)
                acc.append(clock() - t0)
    return statistics.median(td), statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {command}\n# {bench.machine()}\n# {when}; load average before: {os.getloadavg()[0]:.2f}")
    digits, acc_dense, acc_sparse = digits_model()
    data = load_digits_split(seed=0)
    models = {"digits MLP 64-256-256-10": digits, "wide MLP 64-4096-4096-10": wide_model()}
    rows = []
    saved = torch.get_num_threads()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, model in models.items():
            dense = copy.deepcopy(model)
            sparsetorch.remove_masks(dense)
            dense.eval()
            for batch in (1, 64, 256):
                x = data.x_test[:batch] if batch <= len(data.x_test) else torch.rand(batch, 64)
                inf = sparsetorch.to_inference(model, x)
                kernels = ",".join(f"{r['layer']}={r['kernel']}" for r in inf.sparsetorch_plan)
                reps = args.reps if batch == 1 else max(20, args.reps // 5)
                td, ts = time_pair(dense, inf, x, reps, cpu_time=threads == 1)
                row = {"model": name, "threads": threads, "batch": batch, "dense_ms": td * 1e3,
                       "sparse_ms": ts * 1e3, "speedup": td / ts, "samples_per_s": batch / ts, "kernels": kernels}
                rows.append(row)
                print(f"  {name:<26} t={threads} B={batch:<4} dense {td * 1e3:8.3f} ms  sparse {ts * 1e3:8.3f} ms"
                      f"  {td / ts:5.2f}x  {batch / ts:10.0f} samples/s  [{kernels}]", flush=True)
    torch.set_num_threads(saved)
    with torch.no_grad():
        same = sparsetorch.to_inference(digits, data.x_test)(data.x_test).argmax(1).eq(data.y_test).float().mean().item()
    print(f"\ndigits test accuracy: dense {acc_dense:.4f}, 90% pruned + fine-tuned {acc_sparse:.4f}, "
          f"converted {same:.4f}; load average after: {os.getloadavg()[0]:.2f} (shared CPU)")
    out = ROOT / "results" / "bench_inference_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": bench.machine(), "date": when, "rows": rows,
                               "accuracy": {"dense": acc_dense, "pruned": acc_sparse, "converted": same}}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
