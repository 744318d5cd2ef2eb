"""``sparsetorch info FILE``: what a file written by ``sparsetorch.save`` holds, tensor by tensor; given a
compressed-tensors checkpoint folder (llm-compressor), its format and sparse weights."""
from __future__ import annotations

import argparse
import json
import os

NAME = "info"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="list the tensors of a saved sparse model: format, sparsity, bytes",
                       description="Per tensor of a file written by sparsetorch.save: storage format, value codec, "
                                   "shape, dtype, kept weights and sparsity, stored bytes and the ratio to dense; "
                                   "then totals. Every tensor is decoded, so a corrupted file is reported. A folder "
                                   "is read as a compressed-tensors checkpoint (sparse-bitmask / sparse-24-bitmask).")
    p.add_argument("file", help="a .safetensors file written by sparsetorch.save, or a compressed-tensors checkpoint "
                                "folder")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def describe(path: str | os.PathLike) -> dict:
    """Rows (one per tensor) and totals for the file at ``path``; raises ``SparsityError`` if it is bad."""
    import torch

    from .. import formats
    from ..formats.files import PART_SEPARATOR, read_header, read_tensors

    header, raw = read_header(path)
    state, masks = read_tensors(path)  # decodes and validates every tensor
    rows = []
    for key, meta in header["tensors"].items():
        value = state[key]
        stored = formats.stored_bytes({n: t for n, t in raw.items() if n.rpartition(PART_SEPARATOR)[0] == key})
        dense = value.numel() * value.element_size()
        nnz = int(masks[key].sum()) if key in masks else int(torch.count_nonzero(value))
        rows.append({"name": key, "format": meta["format"], "values": meta.get("values", "exact"),
                     "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                     "masked": key in masks, "nnz": nnz, "numel": value.numel(),
                     "sparsity": 1 - nnz / value.numel() if value.numel() else 0.0,
                     "stored_bytes": stored, "dense_bytes": dense, "ratio": stored / dense if dense else 1.0})
    stored = sum(r["stored_bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    numel = sum(r["numel"] for r in rows)
    totals = {"tensors": len(rows), "numel": numel, "nnz": sum(r["nnz"] for r in rows),
              "stored_bytes": stored, "dense_bytes": dense, "ratio": stored / dense if dense else 1.0,
              "file_bytes": os.path.getsize(path), "version": header["version"]}
    return {"file": str(path), "tensors": rows, "totals": totals}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe_folder(path: str | os.PathLike) -> dict:
    """The sparse weights of a compressed-tensors checkpoint folder; raises ``SparsityError`` if it is bad."""
    from ..formats.compressed_tensors import read_compressed_tensors

    _, info = read_compressed_tensors(path)
    return {"folder": str(path), **info}


def _run_folder(args) -> int:
    info = describe_folder(args.file)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"compressed-tensors checkpoint, format {info['format']} (config version "
          f"{info['compressed_tensors_version']}), structure {info['sparsity_structure']}, "
          f"files: {', '.join(info['files'])}")
    head = f"{'weight':<44} {'pattern':<12} {'shape':<12} {'dtype':<9} {'nnz':>10} {'sparsity':>8}"
    print(head)
    print("-" * len(head))
    for name, w in info["sparse_weights"].items():
        print(f"{name:<44} {w['pattern']:<12} {'x'.join(map(str, w['shape'])):<12} {w['dtype']:<9} {w['nnz']:>10} "
              f"{w['sparsity']:>8.1%}")
    print("-" * len(head))
    print(f"{len(info['sparse_weights'])} sparse weights, {info['sparsity_of_sparse_weights']:.1%} sparse together")
    return 0


def run(args) -> int:
    if os.path.isdir(args.file):
        return _run_folder(args)
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    head = f"{'tensor':<32} {'format':<8} {'values':<6} {'shape':<16} {'dtype':<8} {'nnz':>10} {'sparsity':>8} " \
           f"{'stored':>10} {'vs dense':>8}"
    print(head)
    print("-" * len(head))
    for r in info["tensors"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        print(f"{r['name']:<32} {r['format']:<8} {r['values']:<6} {shape:<16} {r['dtype']:<8} {r['nnz']:>10} "
              f"{r['sparsity']:>8.1%} {_size(r['stored_bytes']):>10} {r['ratio']:>8.1%}")
    t = info["totals"]
    print("-" * len(head))
    print(f"{'total (' + str(t['tensors']) + ' tensors)':<32} {'':<8} {'':<6} {'':<16} {'':<8} {t['nnz']:>10} "
          f"{1 - t['nnz'] / max(t['numel'], 1):>8.1%} {_size(t['stored_bytes']):>10} {t['ratio']:>8.1%}")
    print(f"file: {_size(t['file_bytes'])} ({t['file_bytes'] / max(t['dense_bytes'], 1):.1%} of the dense tensors' "
          f"{_size(t['dense_bytes'])}), format version {t['version']}")
    return 0
