"""``sparsetorch demo``: train an MLP on digits, prune it one-shot at several sparsities, show the table."""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

NAME = "demo"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="train, prune and save a small model on built-in data (about a minute)",
                       description="Train an MLP on scikit-learn's digits, prune it one-shot at several "
                                   "sparsities with and without a short fine-tune, and print accuracy, "
                                   "parameters kept and file size.")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95", help="comma-separated (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs (default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tune epochs after pruning (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--report", default="sparsetorch-demo-report.html",
                   help="HTML report on the 90%%-sparse model (default %(default)s; '' to skip)")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    import sparsetorch
    from sparsetorch.data import load_digits_split
    from sparsetorch.errors import check_sparsity
    from sparsetorch.models import MLP
    from sparsetorch.training import accuracy, fit

    try:
        sparsities = [check_sparsity(float(s)) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise sparsetorch.SparsityError(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}")
    torch.manual_seed(args.seed)
    split = load_digits_split(seed=args.seed)
    steps = 2 + 2 * len(sparsities)
    bar = tqdm(total=steps, desc="demo", unit="model")
    start = time.perf_counter()
    dense = MLP(ARCHITECTURE["kwargs"]["sizes"])
    fit(dense, split.x_train, split.y_train, epochs=args.epochs, generator=torch.Generator().manual_seed(args.seed))
    bar.update()
    rows = []  # one dict per sparsity
    chosen = dense
    with tempfile.TemporaryDirectory() as tmp:
        # the dense row gets the same fine-tune so that the columns compare like with like
        tuned = copy.deepcopy(dense)
        fit(tuned, split.x_train, split.y_train, epochs=args.finetune_epochs, lr=5e-4,
            generator=torch.Generator().manual_seed(args.seed))
        rows.append(_row(sparsetorch, dense, 0.0, split, accuracy(dense, split.x_test, split.y_test),
                         accuracy(tuned, split.x_test, split.y_test), tmp))
        bar.update()
        for s in sparsities:
            pruned = sparsetorch.prune(copy.deepcopy(dense), s)
            acc = accuracy(pruned, split.x_test, split.y_test)
            bar.update()
            fit(pruned, split.x_train, split.y_train, epochs=args.finetune_epochs, lr=5e-4,
                generator=torch.Generator().manual_seed(args.seed))
            bar.update()
            rows.append(_row(sparsetorch, pruned, s, split, acc, accuracy(pruned, split.x_test, split.y_test), tmp))
            if s == 0.9 or (s == sparsities[-1] and 0.9 not in sparsities):
                chosen = pruned
        if args.report:
            _write_report(sparsetorch, chosen, split, args.report, tmp)
        bar.close()
    print(_table(rows))
    if args.report:
        print(f"wrote an HTML report on the {sparsetorch.report(chosen).sparsity:.0%}-sparse model: {args.report}")
    print(f"\nMLP 64-256-256-10 on digits ({len(split.x_train)} train / {len(split.x_test)} test), global magnitude "
          f"pruning of the hidden layers (classifier kept dense); {time.perf_counter() - start:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


ARCHITECTURE = {"factory": "sparsetorch.models:MLP", "kwargs": {"sizes": [64, 256, 256, 10]}}


def _write_report(sparsetorch, model, split, out, tmp) -> None:
    from sparsetorch.explain.html import write_report

    path = sparsetorch.save(model, os.path.join(tmp, "report-model.safetensors"),
                            metadata={"architecture": ARCHITECTURE, "input_shape": [64], "image_shape": [8, 8]})
    write_report(out, model, example_inputs=split.x_test[:1], data=split.x_test, targets=split.y_test,
                 image_shape=(8, 8), file_path=path, title="sparsetorch demo: digits MLP, magnitude pruning + fine-tune")


def _row(sparsetorch, model, sparsity, split, acc, acc_ft, tmp) -> dict:
    path = sparsetorch.save(model, os.path.join(tmp, f"model-{sparsity}.safetensors"))
    rep = sparsetorch.report(model)
    return {"sparsity": sparsity, "accuracy": acc, "accuracy_finetuned": acc_ft,
            "params_kept": rep.total.nonzeros, "params": rep.total.params, "file_bytes": os.path.getsize(path)}


def _table(rows: list[dict]) -> str:
    head = ["sparsity", "accuracy", "+ fine-tune", "params kept", "file size"]
    dense_bytes = rows[0]["file_bytes"]
    lines = [head]
    for r in rows:
        ft = "-" if r["accuracy_finetuned"] is None else f"{r['accuracy_finetuned']:.1%}"
        lines.append([f"{r['sparsity']:.0%}" if r["sparsity"] else "dense", f"{r['accuracy']:.1%}", ft,
                      f"{r['params_kept']:,} / {r['params']:,}",
                      f"{r['file_bytes'] / 1024:.0f} KB ({r['file_bytes'] / dense_bytes:.0%})"])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)
