"""Measuring kernel candidates: interleaved median timing, the per-process choice cache, and the
tolerance by which a candidate's output must agree with the dense layer's."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["KERNEL_CACHE", "clear_kernel_cache", "time_candidates", "rtol", "max_error", "outputs_close"]

# (kind, out, in, density, pattern, batch, threads, isa) -> winning kernel name
KERNEL_CACHE: dict[tuple, str] = {}


def clear_kernel_cache() -> None:
    """Forget the measured kernel choices (they are per process anyway)."""
    KERNEL_CACHE.clear()


# Read before each timed call when timing decode: twice a large last-level cache, so every candidate starts with
# its weight out of cache, as a decode step finds a weight it reads once per token
EVICT_BYTES = 64 << 20


def time_candidates(fns: dict[str, Callable[[], torch.Tensor]], budget_s: float, cuda: bool,
                    cold: bool = False) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds (fair under shared-CPU noise).
    ``cold``: each call after reading EVICT_BYTES of other memory. Called back to back, a layer's weight stays in
    cache, where torch's dense kernel reads a dense weight's 3x the bytes at cache speed and comes near a
    70%-sparse kernel; a choice made there is shared by every layer of that shape, and one conversion of the 1B
    Llama at 70% fp32 put such a shape on torch's dense kernel (benchmarks/results/decode_1b_compiled.json, kernels
    of the compiled fp32 row), which streamed from memory is 3-5x slower. Timed cold, the candidates are compared
    as decode runs them."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flush = torch.ones(EVICT_BYTES // 4) if cold and not cuda else None

    def once(fn) -> float:
        if flush is not None:
            flush.sum()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    first = {k: min(once(fn), once(fn)) for k, fn in fns.items()}  # warm-up (caches, lazy setup)
    rounds = int(max(5, min(40, budget_s / max(sum(first.values()), 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(once(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def rtol(dtype: torch.dtype) -> float:
    """Relative agreement expected between sparse and dense results (summation order differs)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def max_error(a, b) -> float:
    """Largest error of a against b beyond the float tolerance (0 when they agree), over nested outputs."""
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            return 0.0
        tol = rtol(b.dtype) * (float(b.abs().max()) + 1e-6) + 1e-5
        err = float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")
        return 0.0 if err <= tol else err
    if isinstance(a, (tuple, list)):
        return max([max_error(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, dict):
        return max([max_error(a[k], b[k]) for k in a], default=0.0)
    return 0.0


def outputs_close(a, b) -> bool:
    return max_error(a, b) == 0.0
