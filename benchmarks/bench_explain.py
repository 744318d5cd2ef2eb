"""Do the explain tools find what matters? And does sparsity help with little data?

1. Planted features: 100 inputs, 5 of which decide the label (a nonlinear function), 5000
   training samples, 3 seeds. Train GMP, RigL and Static (ERK; the negative control: its
   connectivity is fixed at random before seeing data) at 98% sparsity and check whether
   ``feature_importance`` ranks the 5 planted features on top (precision@5).
2. Generalisation with little data: dense vs GMP and RigL at 90% and 98% trained on 10%, 25%
   and 100% of the planted training set and of digits; test accuracy and train/test gap.

    .venv/bin/python benchmarks/bench_explain.py            # full (3 seeds)
    .venv/bin/python benchmarks/bench_explain.py --quick    # 1 seed, fewer epochs
Writes benchmarks/results/bench_explain.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetorch import explain
from sparsetorch.cli.train import build_and_train
from sparsetorch.data import load_digits_split
from sparsetorch.data.planted import planted_features
from sparsetorch.models import MLP
from sparsetorch.recipes.training_loop import accuracy

RESULTS = Path(__file__).parent / "results"


def train(method: str, sparsity: float, split, sizes, seed: int, epochs: int, fraction: float = 1.0):
    torch.manual_seed(seed)
    n = max(32, int(len(split.x_train) * fraction))
    x, y = split.x_train[:n], split.y_train[:n]
    model = MLP(sizes)
    build_and_train(method, sparsity, model, (x, y, split.x_test, split.y_test), epochs=epochs, lr=1e-3,
                    batch_size=64, seed=seed)
    return model, accuracy(model, x, y), accuracy(model, split.x_test, split.y_test)


def planted_study(seeds, epochs) -> list[dict]:
    rows = []
    for seed in seeds:
        split, planted = planted_features(generator=torch.Generator().manual_seed(seed))
        for method in ("gmp", "rigl", "static"):
            model, _, test = train(method, 0.98, split, (100, 256, 256, 2), seed, epochs)
            row = {"seed": seed, "method": method, "test_accuracy": test, "planted": planted}
            for how in ("connectivity", "paths"):
                top = torch.topk(explain.feature_importance(model, how), 5).indices.tolist()
                row[f"precision@5_{how}"] = len(set(top) & set(planted)) / 5
            rows.append(row)
            print(f"  planted seed={seed} {method:6s} acc={test:.3f} p@5 conn={row['precision@5_connectivity']:.1f} "
                  f"paths={row['precision@5_paths']:.1f}", flush=True)
    return rows


def generalisation_study(seeds, epochs) -> list[dict]:
    rows = []
    datasets = {"planted": lambda s: planted_features(generator=torch.Generator().manual_seed(s))[0],
                "digits": lambda s: load_digits_split(seed=s)}
    sizes = {"planted": (100, 256, 256, 2), "digits": (64, 256, 256, 10)}
    configs = [("dense", 0.0), ("gmp", 0.9), ("rigl", 0.9), ("gmp", 0.98), ("rigl", 0.98)]
    for name, make in datasets.items():
        for fraction in (0.1, 0.25, 1.0):
            for method, sparsity in configs:
                accs = []
                for seed in seeds:
                    _, train_acc, test_acc = train(method, sparsity, make(seed), sizes[name], seed, epochs, fraction)
                    accs.append((train_acc, test_acc))
                tests = [t for _, t in accs]
                rows.append({"data": name, "fraction": fraction, "method": method, "sparsity": sparsity,
                             "test_mean": statistics.mean(tests), "test_std": statistics.pstdev(tests),
                             "gap_mean": statistics.mean(tr - te for tr, te in accs)})
                print(f"  {name:7s} {fraction:4.0%} {method:5s} {sparsity:.0%}: test {rows[-1]['test_mean']:.3f} "
                      f"gap {rows[-1]['gap_mean']:+.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 10 if args.quick else 30
    start = time.time()
    print("planted features (98% sparsity):")
    planted = planted_study(seeds, epochs)
    print("generalisation with little data:")
    general = generalisation_study(seeds, epochs)
    summary = {}
    for method in ("gmp", "rigl", "static"):
        for how in ("connectivity", "paths"):
            ps = [r[f"precision@5_{how}"] for r in planted if r["method"] == method]
            summary[f"{method}_{how}"] = {"min": min(ps), "mean": statistics.mean(ps)}
    meta = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.time() - start)}
    print("\nprecision@5 of the planted features at 98% (min / mean over seeds):")
    print(f"{'method':8s} {'connectivity':>14s} {'paths':>14s}")
    for method in ("gmp", "rigl", "static"):
        c, p = summary[f"{method}_connectivity"], summary[f"{method}_paths"]
        print(f"{method:8s} {c['min']:>6.1f} / {c['mean']:<5.2f} {p['min']:>6.1f} / {p['mean']:<5.2f}")
    print("\ntest accuracy (mean over seeds) and train-test gap:")
    print(f"{'data':8s} {'train':>6s} " + " ".join(f"{m + ' ' + format(s, '.0%'):>16s}" for m, s in
                                                  [("dense", 0.0), ("gmp", 0.9), ("rigl", 0.9), ("gmp", .98), ("rigl", .98)]))
    for name in ("planted", "digits"):
        for fraction in (0.1, 0.25, 1.0):
            cells = [r for r in general if r["data"] == name and r["fraction"] == fraction]
            print(f"{name:8s} {fraction:>6.0%} " + " ".join(f"{r['test_mean']:>8.3f} ({r['gap_mean']:+.2f})" for r in cells))
    print(f"\n{meta['command']} | {meta['machine']} | {meta['date']} | {meta['seconds']} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("bench_explain_quick.json" if args.quick else "bench_explain.json")).write_text(
        json.dumps({"meta": meta, "planted": planted, "planted_summary": summary, "generalisation": general}, indent=1))


if __name__ == "__main__":
    main()
