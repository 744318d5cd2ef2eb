"""Where a sparse training step's time goes: one 38M byte-GPT step (12 x 512, every attention/MLP Linear a
90%-sparse SparseLinear, AdamW, 8 x 256 bytes) with a timer around each compiled-kernel call and around the
SparseLinear forward/backward. The rest of the step is the dense part (attention, GELU, norms, embeddings,
lm_head, optimizer). --gather makes every layer keep the transposed index map (dX by gather, not scatter).

    nice .venv/bin/python benchmarks/profile_sparse_step.py --threads 2 [--gather]
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import sys
import time

import torch

import sparsetorch.sparse_training.sparse_linear as layer_module
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.kernels import training_ops
from sparsetorch.sparse_training import functional, to_sparse_training

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t0
    return wrapper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gather", action="store_true", help="keep a transposed map in every layer (dX by gather)")
    a = p.parse_args()
    print(f"python {' '.join(sys.argv)}\n{platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}, load average {os.getloadavg()[0]:.2f}")
    torch.set_num_threads(a.threads)
    if a.gather:
        layer_module.TRANSPOSED_MAP_MAX_DENSITY = 1.0
    for name in ("pack", "unpack", "spmm", "spmm_t", "sddmm"):
        setattr(_kernels, name, timed(name, getattr(_kernels, name)))
    fn = functional.SparseLinearFunction
    fn.forward = staticmethod(timed("SparseLinear forward", fn.forward))
    fn.backward = staticmethod(timed("SparseLinear backward", fn.backward))
    torch.manual_seed(0)
    model = to_sparse_training(GPT(GPTConfig(layers=12, width=512, heads=8, context=256)), 0.9, "uniform",
                               generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, 256, (a.batch, 257), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model.loss(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: Adam state, scratch pool
        step()
    TIMES.clear()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    total = (time.perf_counter() - t0) / a.steps
    print(f"{a.threads} threads, batch {a.batch} x 256, dX by {'gather' if a.gather else 'scatter'}: "
          f"step {1e3 * total:.0f} ms (mean of {a.steps})")
    for name, t in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {1e3 * t / a.steps:7.1f} ms  {t / a.steps / total:5.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
