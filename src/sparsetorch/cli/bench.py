"""``sparsetorch bench``: a few-second sparse-Linear speed table on this machine (speedup vs dense fp32)."""
from __future__ import annotations

import argparse
import json

NAME = "bench"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="time the sparse Linear kernels against dense on this machine (a few seconds)",
                       description="Short layer table: a 1024x4096 Linear at 50/90/99%% sparsity, batch 1 and 64, "
                                   "sparsetorch's compiled kernels (CSR, block 16x16, N:M) and torch CSR vs dense "
                                   "fp32. The full table is benchmarks/bench_kernels.py.")
    p.add_argument("--shape", default="1024x4096", help="OUTxIN of the layer (default %(default)s)")
    p.add_argument("--sparsity", default="0.5,0.9,0.99", help="comma list (default %(default)s)")
    p.add_argument("--batch", default="1,64", help="comma list (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    p.add_argument("--min-mb", type=int, default=64,
                   help="weights rotate across copies of at least this many MB so calls read DRAM (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return p


def _ints(text: str, what: str, sep: str = ",") -> list[int]:
    from ..errors import SparsityError

    try:
        return [int(v) for v in text.split(sep)]
    except ValueError:
        raise SparsityError(f"--{what} must be a {sep!r}-separated list of integers, got {text!r}") from None


def run(args) -> int:
    import torch

    from ..errors import SparsityError, check_sparsity
    from ..kernels import microbench as bench

    shape = _ints(args.shape.lower(), "shape", "x")
    if len(shape) != 2 or min(shape) < 1:
        raise SparsityError(f"--shape must look like 1024x4096, got {args.shape!r}")
    try:
        sparsities = [check_sparsity(float(s)) for s in args.sparsity.split(",")]
    except ValueError:
        raise SparsityError(f"--sparsity must be a comma list of numbers in [0, 1), got {args.sparsity!r}") from None
    batches = _ints(args.batch, "batch")
    threads = args.threads or torch.get_num_threads()
    names = tuple(n for n in ("csr", "torch-csr", "bsr16", "nm")
                  if not (n == "bsr16" and (shape[0] % 16 or shape[1] % 16)) and not (n == "nm" and shape[1] % 128))
    print(f"# sparsetorch bench on {bench.machine()}, {threads} thread(s)")
    result = bench.run([tuple(shape)], sparsities, batches, [threads], names=names, reps=5,
                       min_bytes=max(args.min_mb, 0) << 20, log=lambda *a: None)
    print(bench.format_table(result))
    print("speedup = dense fp32 time / kernel time; csr/bsr16/nm = sparsetorch's compiled kernels "
          "(block and N:M rows use weights pruned in that pattern), torch-csr = torch.sparse.mm with int32 indices")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
