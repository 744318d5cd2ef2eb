"""``sparsetorch report CHECKPOINT``: one self-contained HTML page explaining a saved sparse model."""
from __future__ import annotations

import argparse
import importlib
import json

NAME = "report"
# architectures a file may name itself; anything else must come from the command line (--model),
# so that opening a file never imports code the file chose
_BUILTIN_FACTORIES = {"sparsetorch.models:MLP", "sparsetorch.models:SmallCNN"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="write an HTML report explaining a saved sparse model",
                       description="Explain a checkpoint written by sparsetorch.save: per-layer sparsity, mask "
                                   "heatmaps, fan-in, dead units, feature importance, critical connections, mask "
                                   "dynamics, cost estimate and file sizes, in one self-contained HTML file.")
    p.add_argument("checkpoint", help="a .safetensors file written by sparsetorch.save")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="import path of a function returning the (dense) architecture, e.g. mypkg.nets:make_net; "
                        "not needed for files of sparsetorch's built-in models")
    p.add_argument("--data", metavar="digits|FILE.npz",
                   help="inputs for the data-driven importance: 'digits' or an .npz with arrays x (and y)")
    p.add_argument("--bench", metavar="FILE.json", action="append", default=[],
                   help="benchmark results to plot as accuracy-vs-sparsity curves (repeatable)")
    p.add_argument("--out", default="report.html", help="output HTML file (default %(default)s)")
    return p


def build_model(spec: str | None, header_user: dict):
    from ..errors import SparsityError

    arch = header_user.get("architecture") if isinstance(header_user, dict) else None
    kwargs: dict = {}
    if spec is None:
        if not isinstance(arch, dict) or arch.get("factory") not in _BUILTIN_FACTORIES:
            raise SparsityError("the file does not name a built-in architecture; pass --model MODULE:FACTORY "
                                "(a function returning the dense model)")
        spec, kwargs = arch["factory"], dict(arch.get("kwargs") or {})
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SparsityError(f"--model must look like 'package.module:function', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)


def load_data(spec: str | None):
    """(inputs, targets or None, image shape or None) for the data-driven sections."""
    if spec is None:
        return None, None, None
    if spec == "digits":
        from ..data import load_digits_split

        split = load_digits_split()
        return split.x_test, split.y_test, (8, 8)
    import numpy as np
    import torch

    with np.load(spec, allow_pickle=False) as arrays:
        x = torch.as_tensor(arrays["x"], dtype=torch.float32)
        y = torch.as_tensor(arrays["y"], dtype=torch.int64) if "y" in arrays else None
    return x, y, None


def load_curves(paths: list[str]) -> dict:
    """Benchmark results -> ``{label: {sparsity: (mean, std)}}`` for the accuracy-vs-sparsity plot.

    Reads the training-quality benchmark's ``{"results": {model: {method: {sparsity: {mean, std}}}}}``
    (labels "model/method") and flat lists of rows ``{method, sparsity, mean[, std]}``.
    """
    curves: dict = {}
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)
        nested = doc.get("results") if isinstance(doc, dict) else None
        if isinstance(nested, dict):
            for model, methods in nested.items():
                for method, points in methods.items():
                    curves[f"{model}/{method}"] = {float(k): (float(v["mean"]), float(v.get("std", 0)))
                                                   for k, v in points.items()}
            continue
        rows = doc.get("rows", []) if isinstance(doc, dict) else doc
        for row in rows:
            if isinstance(row, dict) and {"method", "sparsity", "mean"} <= set(row):
                curves.setdefault(row["method"], {})[float(row["sparsity"])] = (float(row["mean"]), float(row.get("std", 0)))
    if paths and not curves:
        from ..errors import SparsityError

        raise SparsityError(f"no accuracy-vs-sparsity results found in {paths}; pass the training-quality "
                            "benchmark's JSON (benchmarks/results/bench_training_quality.json)")
    return curves


def run(args: argparse.Namespace) -> int:
    import torch

    from ..explain.html import write_report
    from ..formats.files import load, read_header

    header, _ = read_header(args.checkpoint)
    user = header.get("user") or {}
    model = build_model(args.model, user)
    load(model, args.checkpoint)
    x, y, image_shape = load_data(args.data)
    example = x[:1] if x is not None else _example_input(user)
    write_report(args.out, model, example_inputs=example, data=x, targets=y, image_shape=image_shape or _image(user),
                 history=user.get("history"), curves=load_curves(args.bench), file_path=args.checkpoint,
                 title=f"sparsetorch report: {args.checkpoint}")
    print(f"wrote {args.out}")
    return 0


def _example_input(user: dict):
    import torch

    shape = user.get("input_shape")
    return torch.zeros(1, *shape) if isinstance(shape, list) and all(isinstance(s, int) for s in shape) else None


def _image(user: dict):
    shape = user.get("image_shape")
    return tuple(shape) if isinstance(shape, list) and len(shape) == 2 else None
