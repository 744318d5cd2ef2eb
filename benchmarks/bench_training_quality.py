"""Test accuracy of sparse training methods on digits: dense, one-shot + fine-tune, GMP, Static,
SET and RigL (ERK) at 90-99% sparsity, MLP 64-256-256-10 and SmallCNN, Adam, several seeds.

Every method gets the same budget: the same epochs of Adam at the same learning rate and batch
size (one-shot + fine-tune: two thirds dense, prune by global magnitude, one third fine-tune).
Method hyperparameters are the papers' recipes scaled to the run (``registry.for_run``), not
tuned per method. Prints a table (mean +- std over seeds) and the literature's predictions with
pass/miss; writes JSON and a PNG plot to benchmarks/results/.

    .venv/bin/python benchmarks/bench_training_quality.py            # full: 3 seeds, 30 epochs
    .venv/bin/python benchmarks/bench_training_quality.py --quick    # 1 seed, 5 epochs, MLP only
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import sparsetorch
from sparsetorch.cli.train import build_and_train, train_epochs
from sparsetorch.data import load_digits_split
from sparsetorch.models import MLP, SmallCNN
from sparsetorch.training import accuracy

METHODS = ["dense", "oneshot+ft", "gmp", "static", "set", "rigl"]
MODELS = {"mlp": (lambda: MLP((64, 256, 256, 10)), [0.9, 0.95, 0.98, 0.99]),
          "cnn": (lambda: SmallCNN(), [0.9, 0.95, 0.98])}
RESULTS = Path(__file__).parent / "results"


def run_one(model_name: str, method: str, sparsity: float, seed: int, data, args) -> float:
    torch.manual_seed(seed)
    model = MODELS[model_name][0]()
    common = dict(lr=args.lr, batch_size=args.batch_size, seed=seed)
    if method == "oneshot+ft":
        dense_epochs = round(args.epochs * 2 / 3)
        build_and_train("dense", 0.0, model, data, epochs=dense_epochs, **common)
        sparsetorch.prune(model, sparsity)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        train_epochs(model, optimizer, None, data[0], data[1], epochs=args.epochs - dense_epochs,
                     batch_size=args.batch_size, generator=torch.Generator().manual_seed(seed + 1))
    else:
        overrides = {"reinit": True} if args.reinit and method in ("static", "set", "rigl", "srigl") else None
        build_and_train(method, sparsity, model, data, epochs=args.epochs, overrides=overrides, **common)
    return accuracy(model, data[2], data[3])


def summary(accs: list[float]) -> dict:
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs}


def checks(table: dict) -> list[tuple[str, bool, str]]:
    """The literature's predictions on the MLP, as (claim, passed, measured)."""
    mlp = table.get("mlp", {})

    def acc(method, s):
        return mlp.get(method, {}).get(str(s), {}).get("mean")

    dense = mlp.get("dense", {}).get("0.0", {}).get("mean")
    out = []
    if dense is None:
        return out
    for m in METHODS[1:]:
        a = acc(m, 0.9)
        if a is not None:
            out.append((f"90%: {m} within 1 point of dense", a >= dense - 0.01, f"{a:.2%} vs {dense:.2%}"))
    rigl98, static98, gmp98 = acc("rigl", 0.98), acc("static", 0.98), acc("gmp", 0.98)
    if rigl98 is not None and static98 is not None:
        out.append(("98%: RigL >= Static + 2 points", rigl98 >= static98 + 0.02, f"{rigl98:.2%} vs {static98:.2%}"))
        out.append(("98%: RigL >= dense - 2 points", rigl98 >= dense - 0.02, f"{rigl98:.2%} vs {dense:.2%}"))
    if gmp98 is not None:
        out.append(("98%: GMP >= dense - 1 point", gmp98 >= dense - 0.01, f"{gmp98:.2%} vs {dense:.2%}"))
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
        ax.set_xlabel("sparsity of the pruned layers (%)")
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
    parser.add_argument("--lr", type=float, default=3e-3, help="chosen over 1e-3 by one probe (seed 0, dense/Static/RigL/GMP all better)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (default: all)")
    parser.add_argument("--reinit", action="store_true",
                        help="Static/SET/RigL with sparsity-aware re-initialisation (scale by kept fan-in)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small models, busy machine)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, MLP only: a smoke run")
    parser.add_argument("--out", default=str(RESULTS / "bench_training_quality.json"))
    parser.add_argument("--render", metavar="JSON", help="only print/plot a saved (maybe partial) results file")
    args = parser.parse_args()
    if args.render:
        return render_saved(args.render)
    if args.quick:
        args.seeds, args.epochs, args.models = 1, 5, "mlp"
        args.out = str(RESULTS / "bench_training_quality_quick.json")
    torch.set_num_threads(args.threads)
    split = load_digits_split(seed=0)  # one fixed split: seeds vary init, masks and data order
    data = (split.x_train, split.y_train, split.x_test, split.y_test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_training_quality.py" + (" --quick" if args.quick else "") + (
        f" --models {args.models} --methods {args.methods}" + (" --reinit" if args.reinit else "") +
        f" --out {args.out}" if args.methods != ",".join(METHODS) or args.reinit else "")
    meta = {"command": command, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "reinit": args.reinit, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seeds": args.seeds,
            "data": f"digits {len(split.x_train)} train / {len(split.x_test)} test"}
    table: dict = {}
    start = time.perf_counter()
    for model_name in args.models.split(","):
        sparsities = MODELS[model_name][1]
        rows = table.setdefault(model_name, {})
        for method in args.methods.split(","):
            for s in [0.0] if method == "dense" else sparsities:
                accs = [run_one(model_name, method, s, seed, data, args) for seed in range(args.seeds)]
                rows.setdefault(method, {})[str(s)] = summary(accs)
                print(f"{model_name:4s} {method:11s} {s:5.0%}  {statistics.mean(accs):.2%}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                out.write_text(json.dumps({"meta": meta, "results": table}, indent=2))  # partial results survive
    meta["seconds"] = round(time.perf_counter() - start)
    render(table, meta, out)


def render(table: dict, meta: dict, out: Path) -> None:
    """Print the table and the literature checks, write the JSON with them and the PNG plot."""
    verdicts = checks(table)
    out.write_text(json.dumps({"meta": meta, "results": table,
                               "checks": [{"claim": c, "passed": p, "measured": m} for c, p, m in verdicts]},
                              indent=2))
    print(f"\n{meta['command']}\n{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
          f"{meta['date']}; {meta['data']}, Adam lr {meta['lr']}, {meta['epochs']} epochs, batch "
          f"{meta['batch_size']}, {meta['seeds']} seed(s)\n")
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
        print()
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
