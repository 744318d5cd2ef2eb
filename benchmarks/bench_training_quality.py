"""Test accuracy of sparse training methods on digits: dense, one-shot + fine-tune, GMP, Static,
SET and RigL (ERK) at 90-99% sparsity, MLP 64-256-256-10 and SmallCNN, Adam, several seeds.

Protocol (the usual one in the sparse-training literature):
* sparsity counts every Linear/Conv weight of the model, the classifier included (a "98% sparse
  MLP" has 2% of its weights); ERK decides how much each layer keeps;
* every method trains the same 30 epochs of Adam; its batch size and learning rate are chosen per
  method and sparsity on a validation split held out of the training data (grid
  ``--grid-batch`` x ``--grid-lr``, two seeds), then it is retrained on the whole training split
  with ``--seeds`` seeds and scored once on the test split;
* method hyperparameters are the papers' recipes scaled to the run (``registry.for_run``);
  one-shot + fine-tune trains two thirds dense, prunes by global magnitude, fine-tunes one third.

Prints a table (mean +- std over seeds, with the chosen batch/lr) and the literature's
predictions with pass/miss; writes JSON and a PNG plot to benchmarks/results/.

    .venv/bin/python benchmarks/bench_training_quality.py --models mlp        # MLP: tuned, 3 seeds
    .venv/bin/python benchmarks/bench_training_quality.py --models cnn --no-tune \
        --out benchmarks/results/bench_training_quality_cnn.json             # CNN: fixed recipe
    .venv/bin/python benchmarks/bench_training_quality.py --quick            # 1 seed, 5 epochs, MLP only
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsetorch
from sparsetorch.cli.train import build_and_train
from sparsetorch.data import load_digits_split
from sparsetorch.models import MLP, SmallCNN
from sparsetorch.recipes.training_loop import accuracy, fit

METHODS = ["dense", "oneshot+ft", "gmp", "static", "set", "rigl"]
MODELS = {"mlp": (lambda: MLP((64, 256, 256, 10)), [0.9, 0.95, 0.98, 0.99]),
          "cnn": (lambda: SmallCNN(), [0.9, 0.95, 0.98])}
RESULTS = Path(__file__).parent / "results"


def prunable(model: nn.Module) -> list[type]:
    """Every Linear/Conv2d layer type the model has: all weight layers, the classifier included."""
    return [t for t in (nn.Linear, nn.Conv2d) if any(isinstance(m, t) for m in model.modules())]


def run_one(model_name: str, method: str, sparsity: float, seed: int, data, *, lr: float, batch_size: int,
            epochs: int, reinit: bool = False) -> float:
    """Train one model with one method; returns accuracy on ``data``'s evaluation split."""
    torch.manual_seed(seed)
    model = MODELS[model_name][0]()
    common = dict(lr=lr, batch_size=batch_size, seed=seed)
    if method == "oneshot+ft":
        dense_epochs = round(epochs * 2 / 3)
        build_and_train("dense", 0.0, model, data, epochs=dense_epochs, **common)
        sparsetorch.prune(model, sparsity, include=prunable(model))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        fit(model, data[0], data[1], optimizer=optimizer, epochs=epochs - dense_epochs,
            batch_size=batch_size, generator=torch.Generator().manual_seed(seed + 1))
    else:
        overrides = {"include": prunable(model)} if method != "dense" else {}
        if reinit and method in ("static", "set", "rigl", "srigl"):
            overrides["reinit"] = True
        build_and_train(method, sparsity, model, data, epochs=epochs, overrides=overrides, **common)
    return accuracy(model, data[2], data[3])


def validation_split(data, fraction: float = 0.2):
    """(x_fit, y_fit, x_val, y_val): the last ``fraction`` of a fixed shuffle of the training split."""
    x, y = data[0], data[1]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_val = int(len(x) * fraction)
    fit, val = order[n_val:], order[:n_val]
    return x[fit], y[fit], x[val], y[val]


def tune(model_name: str, method: str, sparsity: float, data, args) -> tuple[int, float, dict]:
    """The (batch size, lr) of the grid with the best mean validation accuracy over ``args.tune_seeds``
    seeds (100, 101, ...: never a test seed)."""
    val_data = validation_split(data)
    scores = {}
    for bs in args.grid_batch:
        for lr in args.grid_lr:
            scores[f"{bs}/{lr:g}"] = statistics.mean(
                run_one(model_name, method, sparsity, 100 + i, val_data, lr=lr, batch_size=bs, epochs=args.epochs,
                        reinit=args.reinit) for i in range(args.tune_seeds))
    best = max(scores, key=lambda k: (scores[k], -int(k.split("/")[0])))  # ties: the larger batch (cheaper)
    bs, lr = best.split("/")
    return int(bs), float(lr), scores


def summary(accs: list[float], **extra) -> dict:
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs,
            **extra}


def checks(table: dict, dense: float | None = None, label: str = "dense") -> list[tuple[str, bool, str]]:
    """The literature's predictions on the MLP, as (claim, passed, measured); ``dense`` replaces
    the table's dense accuracy (e.g. the best dense of the grid), ``label`` names it."""
    mlp = table.get("mlp", {})

    def acc(method, s):
        return mlp.get(method, {}).get(str(s), {}).get("mean")

    dense = dense if dense is not None else mlp.get("dense", {}).get("0.0", {}).get("mean")
    out = []
    if dense is None:
        return out
    for m in METHODS[1:]:
        a = acc(m, 0.9)
        if a is not None:
            out.append((f"90%: {m} within 1 point of {label}", a >= dense - 0.01, f"{a:.2%} vs {dense:.2%}"))
    rigl98, static98, gmp98 = acc("rigl", 0.98), acc("static", 0.98), acc("gmp", 0.98)
    if rigl98 is not None and static98 is not None:
        out.append(("98%: RigL >= Static + 2 points", rigl98 >= static98 + 0.02, f"{rigl98:.2%} vs {static98:.2%}"))
        out.append((f"98%: RigL >= {label} - 2 points", rigl98 >= dense - 0.02, f"{rigl98:.2%} vs {dense:.2%}"))
    if gmp98 is not None:
        out.append((f"98%: GMP >= {label} - 1 point", gmp98 >= dense - 0.01, f"{gmp98:.2%} vs {dense:.2%}"))
    rigl99, set99 = acc("rigl", 0.99), acc("set", 0.99)
    if rigl99 is not None and set99 is not None:
        out.append(("99%: RigL >= SET + 2 points", rigl99 >= set99 + 0.02, f"{rigl99:.2%} vs {set99:.2%}"))
    return out


def plot(table: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install 'sparsetorch[plot]'): no plot")
        return False
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.5), squeeze=False)
    for ax, (model_name, rows) in zip(axes[0], table.items()):
        dense = rows.get("dense", {}).get("0.0")
        for method, by_s in rows.items():
            if method == "dense":
                continue
            xs = sorted(float(s) for s in by_s)
            means = [by_s[str(s)]["mean"] * 100 for s in xs]
            stds = [by_s[str(s)]["std"] * 100 for s in xs]
            ax.errorbar([s * 100 for s in xs], means, yerr=stds, marker="o", capsize=3, label=method)
        if dense:
            ax.axhline(dense["mean"] * 100, color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("sparsity (% of all Linear/Conv weights)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model_name} on digits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3, help="with --no-tune: Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="with --no-tune: batch size")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="use --lr/--batch-size for every method instead of choosing them on validation data")
    parser.add_argument("--tune-seeds", type=int, default=2, help="seeds per grid point on validation")
    parser.add_argument("--grid-batch", type=lambda v: [int(b) for b in v.split(",")], default=[16, 32])
    parser.add_argument("--grid-lr", type=lambda v: [float(x) for x in v.split(",")], default=[3e-3, 1e-2])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (default: all)")
    parser.add_argument("--reinit", action="store_true",
                        help="Static/SET/RigL with sparsity-aware re-initialisation (scale by kept fan-in)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small models, busy machine)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, MLP only: a smoke run")
    parser.add_argument("--out", default=str(RESULTS / "bench_training_quality.json"))
    parser.add_argument("--dense-grid", action="store_true",
                        help="only: dense test accuracy at every grid point (--seeds seeds), added for reference to "
                             "the existing results file --out (the checks keep the validation-chosen dense)")
    parser.add_argument("--render", metavar="JSON", help="only print/plot a saved (maybe partial) results file")
    args = parser.parse_args()
    if args.render:
        return render_saved(args.render)
    if args.quick:
        args.seeds, args.epochs, args.models, args.grid_batch, args.grid_lr, args.tune_seeds = 1, 5, "mlp", [32], [1e-2], 1
        args.out = str(RESULTS / "bench_training_quality_quick.json")
    torch.set_num_threads(args.threads)
    split = load_digits_split(seed=0)  # one fixed split: seeds vary init, masks and data order
    data = (split.x_train, split.y_train, split.x_test, split.y_test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_training_quality.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "reinit": args.reinit, "epochs": args.epochs, "seeds": args.seeds, "tuned": args.tune,
            "recipe": (f"batch x lr chosen per method/sparsity on validation from {args.grid_batch} x {args.grid_lr}"
                       if args.tune else f"batch {args.batch_size}, lr {args.lr} for every method"),
            "sparsity": "over every Linear/Conv weight, classifier included",
            "data": f"digits {len(split.x_train)} train / {len(split.x_test)} test"}
    if args.dense_grid:
        return add_dense_grid(args, data, out)
    table: dict = {}
    start = time.perf_counter()
    for model_name in args.models.split(","):
        sparsities = MODELS[model_name][1]
        rows = table.setdefault(model_name, {})
        for method in args.methods.split(","):
            for s in [0.0] if method == "dense" else sparsities:
                bs, lr, val = tune(model_name, method, s, data, args) if args.tune else (args.batch_size, args.lr, {})
                accs = [run_one(model_name, method, s, seed, data, lr=lr, batch_size=bs, epochs=args.epochs,
                                reinit=args.reinit) for seed in range(args.seeds)]
                rows.setdefault(method, {})[str(s)] = summary(accs, batch_size=bs, lr=lr, validation=val)
                print(f"{model_name:4s} {method:11s} {s:5.0%}  {statistics.mean(accs):.2%}  (batch {bs}, lr {lr:g}; "
                      f"{time.perf_counter() - start:.0f} s)", flush=True)
                out.write_text(json.dumps({"meta": meta, "results": table}, indent=2))  # partial results survive
    meta["seconds"] = round(time.perf_counter() - start)
    render(table, meta, out)


def add_dense_grid(args, data, out: Path) -> None:
    """Dense at every (batch, lr) of the grid, scored on test: shows how much the recipe alone moves dense."""
    saved = json.loads(out.read_text())
    grid = saved["meta"].setdefault("dense_grid", {})
    for model_name in args.models.split(","):
        for bs in args.grid_batch:
            for lr in args.grid_lr:
                accs = [run_one(model_name, "dense", 0.0, seed, data, lr=lr, batch_size=bs, epochs=args.epochs)
                        for seed in range(args.seeds)]
                grid.setdefault(model_name, {})[f"{bs}/{lr:g}"] = summary(accs)
                print(f"{model_name} dense batch {bs} lr {lr:g}: {statistics.mean(accs):.2%}", flush=True)
    render(saved["results"], saved["meta"], out)


def render(table: dict, meta: dict, out: Path) -> None:
    """Print the table and the literature checks, write the JSON with them and the PNG plot."""
    verdicts = checks(table)
    grid = meta.get("dense_grid", {}).get("mlp")
    if grid:  # the strict reading: against the best dense recipe as scored on test (no method got that)
        best = max(v["mean"] for v in grid.values())
        verdicts += [v for v in checks(table, best, "best-on-test dense") if "dense" in v[0]]
    out.write_text(json.dumps({"meta": meta, "results": table,
                               "checks": [{"claim": c, "passed": p, "measured": m} for c, p, m in verdicts]},
                              indent=2))
    print(f"\n{meta['command']}\n{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
          f"{meta['date']}; {meta['data']}, Adam, {meta['epochs']} epochs, {meta['seeds']} seed(s);\n"
          f"{meta.get('recipe', '')}; sparsity {meta.get('sparsity', 'of the default layers')}\n")
    for model_name, rows in table.items():
        sparsities = MODELS[model_name][1]
        dense = rows.get("dense", {}).get("0.0")
        print(f"{model_name}: test accuracy %, mean +- std over seeds" +
              (f" (dense {dense['mean']:.2%} +- {dense['std']:.2%})" if dense else ""))
        print(f"{'method':12s}" + "".join(f"{s:>16.0%}" for s in sparsities))
        for method in METHODS[1:]:
            cells = [rows.get(method, {}).get(str(s)) for s in sparsities]
            print(f"{method:12s}" + "".join(f"{c['mean'] * 100:>10.2f} +-{c['std'] * 100:4.2f}" if c else
                                            f"{'not run':>16s}" for c in cells))
            if any(c and "batch_size" in c for c in cells):
                print(f"{'  batch/lr':12s}" + "".join(f"{c['batch_size']:>10d}/{c['lr']:<5g}" if c else " " * 16
                                                    for c in cells))
        print()
    for model_name, grid in meta.get("dense_grid", {}).items():
        print(f"{model_name}: dense on test at every grid point (reference only): " +
              ", ".join(f"batch/lr {k} {v['mean']:.2%} +-{v['std']:.2%}" for k, v in grid.items()))
    for claim, passed, measured in verdicts:
        print(f"[{'pass' if passed else 'MISS'}] {claim}: {measured}")
    png = out.with_suffix(".png")
    if plot(table, png):
        print(f"\nwrote {out} and {png}")


def render_saved(path: str) -> None:
    """Re-render a (possibly partial) results file written by a run."""
    saved = json.loads(Path(path).read_text())
    render(saved["results"], saved["meta"], Path(path))


if __name__ == "__main__":
    main()
