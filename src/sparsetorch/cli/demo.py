"""``sparsetorch demo``: train an MLP on digits, prune it one-shot and with GMP and RigL, show the table."""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

NAME = "demo"
ARCHITECTURE = {"factory": "sparsetorch.models:MLP", "kwargs": {"sizes": [64, 256, 256, 10]}}
TRAINING_METHODS = ("gmp", "rigl")  # trained sparse over the dense run's budget, at --train-sparsity


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="train, prune and save a small model on built-in data (well under a minute)",
                       description="Train an MLP on scikit-learn's digits, prune it one-shot at several "
                                   "sparsities with and without a short fine-tune, train it sparse with GMP and "
                                   "RigL, and print accuracy, parameters kept and file size; then write an HTML "
                                   "report on the RigL model.")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95", help="one-shot sparsities (default %(default)s)")
    p.add_argument("--train-sparsity", type=float, default=0.9, help="GMP/RigL sparsity (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="dense (and GMP/RigL) training epochs (default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tune epochs after pruning (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--report", default="sparsetorch-demo-report.html",
                   help="HTML report on the RigL model (default %(default)s; '' to skip)")
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    import sparsetorch
    from sparsetorch.data import load_digits_split
    from sparsetorch.errors import check_sparsity

    try:
        sparsities = [check_sparsity(float(s)) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise sparsetorch.SparsityError(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}")
    train_sparsity = check_sparsity(args.train_sparsity, "--train-sparsity")
    split = load_digits_split(seed=args.seed)
    bar = tqdm(total=2 + 2 * len(sparsities) + len(TRAINING_METHODS), desc="demo", unit="model")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = _Demo(args, split, tmp, bar)
        dense = demo.train(None)
        # the dense row gets the same fine-tune as the pruned ones so that the columns compare like with like
        rows.append(demo.row("dense", dense, 0.0, demo.acc(dense), demo.acc(demo.finetune(copy.deepcopy(dense)))))
        for s in sparsities:
            pruned = sparsetorch.prune(copy.deepcopy(dense), s)
            acc = demo.acc(pruned)
            bar.update()
            rows.append(demo.row("one-shot magnitude", pruned, s, acc, demo.acc(demo.finetune(pruned))))
        trained = {}
        for method in TRAINING_METHODS:
            trained[method] = demo.train(method, train_sparsity)
            rows.append(demo.row(method.upper() if method == "gmp" else "RigL", trained[method].model,
                                 train_sparsity, demo.acc(trained[method].model), None))
        if args.report:
            demo.write_report(trained["rigl"])
    bar.close()
    print(_table(rows))
    print(f"\nMLP 64-256-256-10 on digits ({len(split.x_train)} train / {len(split.x_test)} test); hidden layers "
          f"pruned (classifier kept dense): one-shot global magnitude from the trained dense model, GMP and RigL "
          f"(ERK) trained sparse for {args.epochs} epochs; {time.perf_counter() - start:.0f} s.")
    if args.report:
        print(f"HTML report on the RigL model: {args.report}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


class _Demo:
    """The steps the demo repeats, sharing data, seed, temp folder and progress bar."""

    def __init__(self, args, split, tmp, bar):
        self.args, self.split, self.tmp, self.bar = args, split, tmp, bar

    def _generator(self):
        import torch

        return torch.Generator().manual_seed(self.args.seed)

    def train(self, method: str | None, sparsity: float = 0.0):
        """Dense training (method None) or sparse training with a registered method; returns model or sparsifier."""
        import math

        import torch

        from sparsetorch.models import MLP
        from sparsetorch.sparsifiers.method_registry import for_run, make_sparsifier
        from sparsetorch.recipes.training_loop import fit

        torch.manual_seed(self.args.seed)
        model = MLP(ARCHITECTURE["kwargs"]["sizes"])
        holder = {}
        if method is not None:
            steps = self.args.epochs * math.ceil(len(self.split.x_train) / 64)
            hyper = for_run(method, sparsity=sparsity, total_steps=steps)

            def make(model, optimizer):
                holder["s"] = make_sparsifier(method, generator=self._generator(), **hyper).attach(model, optimizer)
                return holder["s"]
        fit(model, self.split.x_train, self.split.y_train, epochs=self.args.epochs, generator=self._generator(),
            make_sparsifier=make if method is not None else None)
        self.bar.update()
        return holder["s"] if method is not None else model

    def finetune(self, model):
        from sparsetorch.recipes.training_loop import fit

        fit(model, self.split.x_train, self.split.y_train, epochs=self.args.finetune_epochs, lr=5e-4,
            generator=self._generator())
        self.bar.update()
        return model

    def acc(self, model) -> float:
        from sparsetorch.recipes.training_loop import accuracy

        return accuracy(model, self.split.x_test, self.split.y_test)

    def row(self, method, model, sparsity, acc, acc_ft) -> dict:
        import sparsetorch

        path = sparsetorch.save(model, os.path.join(self.tmp, f"{method}-{sparsity}.safetensors"))
        rep = sparsetorch.report(model)
        return {"method": method, "sparsity": sparsity, "accuracy": acc, "accuracy_finetuned": acc_ft,
                "params_kept": rep.total.nonzeros, "params": rep.total.params, "file_bytes": os.path.getsize(path)}

    def write_report(self, sparsifier) -> None:
        import sparsetorch
        from sparsetorch.explain.html import write_report

        model, history = sparsifier.model, sparsifier.history
        path = sparsetorch.save(model, os.path.join(self.tmp, "report-model.safetensors"), metadata={
            "architecture": ARCHITECTURE, "input_shape": [64], "image_shape": [8, 8], "history": history})
        split = self.split
        write_report(self.args.report, model, example_inputs=split.x_test[:1], data=split.x_test,
                     targets=split.y_test, image_shape=(8, 8), history=history, file_path=path,
                     title="sparsetorch demo: digits MLP trained sparse with RigL")


def _table(rows: list[dict]) -> str:
    head = ["method", "sparsity", "accuracy", "+ fine-tune", "params kept", "file size"]
    dense_bytes = rows[0]["file_bytes"]
    lines = [head]
    for r in rows:
        ft = "-" if r["accuracy_finetuned"] is None else f"{r['accuracy_finetuned']:.1%}"
        lines.append([r["method"], f"{r['sparsity']:.0%}", f"{r['accuracy']:.1%}", ft,
                      f"{r['params_kept']:,} / {r['params']:,}",
                      f"{r['file_bytes'] / 1024:.0f} KB ({r['file_bytes'] / dense_bytes:.0%})"])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))) for l in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)
