"""File size and speed of sparsetorch's storage formats: a 4096x4096 layer and a whole 90%-sparse digits MLP.

    nice .venv/bin/python benchmarks/bench_storage.py            # ~8 min on 2 cores shared with other jobs
    .venv/bin/python benchmarks/bench_storage.py --size 1024     # quick look

Every number is a real file written by ``sparsetorch.save`` (its size on disk, header included) divided
by the size of the plain dense fp32 safetensors file of the same model (``safetensors.torch.save_file``). Per sparsity (random unstructured masks, exact
counts) it saves with the default choice ("auto") for each value codec and with each format forced (fp32), plus
2:4 and block-16x16 masks for N:M and BSR. "csr-int32" is torch's own CSR with int32 indices (arrays
only, no file), the usual baseline. Encode/decode: seconds for the fp32 layer, best of two runs, through
``sparsetorch.formats``; save/load: the whole ``sparsetorch.save`` / ``sparsetorch.load``.
The digits MLP (64-256-256-10) is trained, 90% of every Linear weight pruned (classifier included),
fine-tuned with its masks; for each codec: file ratio and test accuracy after loading the file back.
Writes JSON to benchmarks/results/bench_storage.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError, formats
from sparsetorch.core.masks import set_mask
from sparsetorch.core.patterns import parse_pattern, pattern_mask

ROOT = Path(__file__).resolve().parent
FORMATS = ["auto", "dense", "bitmask", "csr", "gapmask", "nm", "bsr"]
VALUES = ["fp32", "fp16", "bf16", "int8"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}"


def layer(n: int, pattern: str, density: float, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, n, generator=g) / n**0.5)
    set_mask(lin, pattern_mask(torch.rand(n, n, generator=g), density, parse_pattern(pattern)))
    return lin


def plain_size(model: nn.Module, tmp: Path) -> int:
    """Size of the plain dense fp32 safetensors file of ``model`` (the baseline of every ratio)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "plain.safetensors"))
    return os.path.getsize(tmp / "plain.safetensors")


def best_of(fn, reps: int = 2) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def layer_rows(n: int, tmp: Path) -> list[dict]:
    dense_bytes = plain_size(nn.Linear(n, n, bias=False), tmp)
    cases = [("unstructured", s) for s in (0.5, 0.7, 0.9, 0.95, 0.99)] + [("2:4", 0.5), ("block:16x16", 0.9)]
    rows = []
    for pattern, sparsity in cases:
        lin = layer(n, pattern, 1 - sparsity)
        w, mask = lin.weight.detach(), lin.weight_mask
        csr = w.to_sparse_csr()
        row = {"pattern": pattern, "sparsity": sparsity, "nnz": int(mask.sum()), "ratio": {}, "time": {},
               "csr-int32": (csr.values().numel() * 4 + (csr.col_indices().numel() + csr.crow_indices().numel()) * 4)
               / dense_bytes}
        for fmt in FORMATS:
            for values in (VALUES if fmt == "auto" else ["fp32"]):  # forced formats: the lossless file only
                path = tmp / f"{fmt}-{values}.safetensors"
                try:
                    t, _ = best_of(lambda: sparsetorch.save(lin, path, format=None if fmt == "auto" else fmt,
                                                             values=values), reps=1)
                except SparsityError:
                    continue  # N:M on an unstructured mask, BSR on an unblocked one
                row["ratio"][f"{fmt}/{values}"] = os.path.getsize(path) / dense_bytes
                if values == "fp32":
                    fresh = nn.Linear(n, n, bias=False)
                    load_s, _ = best_of(lambda: sparsetorch.load(fresh, path), reps=1)
                    assert torch.equal(fresh.weight, w), fmt
                    row["time"][f"{fmt}/save"], row["time"][f"{fmt}/load"] = t, load_s
                    if fmt != "auto":
                        enc, (parts, meta) = best_of(lambda: formats.encode(fmt, w, mask))
                        dec, _ = best_of(lambda: formats.decode(parts, meta))
                        row["time"][f"{fmt}/encode"], row["time"][f"{fmt}/decode"] = enc, dec
        row["auto_format"] = sparsetorch.formats.files.choose_format(w, mask)
        rows.append(row)
        print(f"  {pattern} {sparsity:.0%} done", file=sys.stderr)
    return rows


def model_rows(tmp: Path) -> dict:
    from sparsetorch.data.digits import load_digits_split
    from sparsetorch.models import MLP
    from sparsetorch.recipes.training_loop import accuracy, fit

    data = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = fit(MLP((64, 256, 256, 10)), data.x_train, data.y_train, epochs=20)
    dense_bytes = plain_size(model, tmp)
    dense_acc = accuracy(model, data.x_test, data.y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(model, 0.9, include=[nn.Linear])
    fit(model, data.x_train, data.y_train, epochs=10)
    out = {"dense_acc": dense_acc, "sparse_acc": accuracy(model, data.x_test, data.y_test), "codecs": {}}
    for values in VALUES:
        path = sparsetorch.save(model, tmp / f"model-{values}.safetensors", values=values)
        fresh = sparsetorch.load(MLP((64, 256, 256, 10)), path)
        from sparsetorch.cli.info import describe

        out["codecs"][values] = {"ratio": os.path.getsize(path) / dense_bytes,
                                 "acc": accuracy(fresh, data.x_test, data.y_test),
                                 "formats": {r["name"]: r["format"] for r in describe(path)["tensors"]}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="the layer is SIZExSIZE (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_storage.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    header = {"command": "python benchmarks/bench_storage.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "machine": machine(), "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    with tempfile.TemporaryDirectory() as d:
        rows = layer_rows(args.size, Path(d))
        model = model_rows(Path(d))
    print(f"# {header['command']}\n# {header['machine']}\n# {header['date']}")
    print(f"\nFile size / dense fp32 file, {args.size}x{args.size} Linear, default format choice per value codec "
          "(csr-int32: torch CSR arrays, int32 indices)")
    cols = [f"{f}/{v}" for f in FORMATS for v in VALUES]
    print(f"{'pattern':<13}{'sparsity':>9}{'csr-int32':>10}" + "".join(f"{c:>11}" for c in cols[:4]))
    for r in rows:
        print(f"{r['pattern']:<13}{r['sparsity']:>9.0%}{r['csr-int32']:>10.1%}"
              + "".join(f"{r['ratio'].get(c, float('nan')):>11.1%}" for c in cols[:4]) + f"  auto={r['auto_format']}")
    print(f"\nLossless (fp32) file size / dense fp32 file, each format forced (n/a: does not apply to the mask)")
    print(f"{'pattern':<13}{'sparsity':>9}" + "".join(f"{f:>9}" for f in FORMATS[1:]))
    for r in rows:
        print(f"{r['pattern']:<13}{r['sparsity']:>9.0%}" + "".join(
            f"{r['ratio'][f + '/fp32']:>9.1%}" if f + "/fp32" in r["ratio"] else f"{'n/a':>9}" for f in FORMATS[1:]))
    print(f"\nseconds (fp32): encode / decode per format; save / load for auto")
    print(f"{'pattern':<13}{'sparsity':>9}" + "".join(f"{f:>14}" for f in FORMATS))
    for r in rows:
        cells = []
        for f in FORMATS:
            a, b = ("save", "load") if f == "auto" else ("encode", "decode")
            t = r["time"]
            cells.append(f"{t[f + '/' + a]:.2f}/{t[f + '/' + b]:.2f}" if f + "/" + a in t else "n/a")
        print(f"{r['pattern']:<13}{r['sparsity']:>9.0%}" + "".join(f"{c:>14}" for c in cells))
    print(f"\nDigits MLP 64-256-256-10, 90% of every Linear weight pruned, fine-tuned: test accuracy dense "
          f"{model['dense_acc']:.3f}, sparse {model['sparse_acc']:.3f}")
    print(f"{'values':<8}{'file/dense':>11}{'accuracy':>10}  formats")
    for v, c in model["codecs"].items():
        print(f"{v:<8}{c['ratio']:>11.1%}{c['acc']:>10.3f}  " + ", ".join(f"{k}:{f}" for k, f in c["formats"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**header, "layer_size": args.size, "layer": rows, "model": model}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
