"""Layer-level timing of sparse Linear kernels vs dense fp32 (shared by ``sparsetorch bench`` and
benchmarks/bench_kernels.py).

Method (the CPU is shared, so every choice here is about fairness under noise):
* candidates run interleaved, call by call, and each reports the median of its calls;
* weights rotate across copies totalling >= ``min_bytes`` (128 MB by default), so every call reads its
  weights from DRAM as in a multi-layer model, not from a warm L3;
* with 1 thread the time is the median of the calling thread's CPU time (immune to time-slicing by other
  jobs); with more threads it is the fastest wall time of the calls (the quietest moment; a median of wall
  times mostly measures the other jobs when the cores are shared).
"""
from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import has_extension
from .packed import BSRWeight, CSRWeight, NMWeight

NM_M = 128  # N:M group for arbitrary sparsity: n = round(128 * density) keeps exactly n per 128 inputs


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> dict[str, float]:
    """GB/s of a torch copy (read + write counted) and of a read-only sum, over nbytes."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t_copy, t_sum = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        t_copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        t_sum.append(time.perf_counter() - t0)
    return {"copy_gbs": 2 * nbytes / min(t_copy) / 1e9, "read_gbs": nbytes / min(t_sum) / 1e9}


def _masked_weight(out: int, inp: int, sparsity: float, pattern: str, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out, inp, generator=gen) * 0.02
    if pattern == "unstructured":
        keep = torch.rand(out, inp, generator=gen) >= sparsity
    elif pattern.startswith("block"):
        b = int(pattern[5:])
        keep = (torch.rand(out // b, inp // b, generator=gen) >= sparsity)
        keep = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    else:  # "nm": exactly n of every NM_M inputs
        n = max(1, round(NM_M * (1 - sparsity)))
        scores = torch.rand(out, inp // NM_M, NM_M, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, -1).indices, True)
        keep = keep.reshape(out, inp)
    return w * keep


def candidates(out: int, inp: int, sparsity: float, gen: torch.Generator,
               names: tuple[str, ...]) -> dict[str, tuple[object, int, float]]:
    """name -> (weight: dense tensor or PackedWeight, bytes per call at batch 1, actual sparsity).

    Names: dense, csr, torch-csr (unstructured W); bsr16 / torch-bsr16 / bsr4 / torch-bsr4 (W pruned in
    blocks); nm (n of every 128 inputs). dense is the unstructured W stored dense.
    """
    wu = _masked_weight(out, inp, sparsity, "unstructured", gen)
    base: dict[str, tuple[object, float]] = {"dense": (wu, sparsity)}
    ext = has_extension()
    for name in names:
        if name in ("csr", "torch-csr") and (ext or name == "torch-csr"):
            base[name] = (CSRWeight.from_dense(wu), sparsity)
        elif name.removeprefix("torch-").startswith("bsr") and (ext or name.startswith("torch")):
            b = int(name.split("bsr")[1])
            wb = _masked_weight(out, inp, sparsity, f"block{b}", gen)
            base[name] = (BSRWeight.from_dense(wb, b, b), float((wb == 0).float().mean()))
        elif name == "nm" and ext:
            n = max(1, round(NM_M * (1 - sparsity)))
            base[name] = (NMWeight.from_dense(_masked_weight(out, inp, sparsity, "nm", gen), n, NM_M), 1 - n / NM_M)
    return {name: (w, _nbytes(w), s) for name, (w, s) in base.items()}


def _nbytes(w) -> int:
    return w.numel() * 4 if isinstance(w, torch.Tensor) else w.nbytes


def _copies(w, n: int) -> list:
    out = []
    for _ in range(n):
        c = w.clone() if isinstance(w, torch.Tensor) else copy.deepcopy(w)
        out.append(c)
    return out


def _call(name: str, w, x: torch.Tensor):
    if name == "dense":
        return lambda: F.linear(x, w)
    backend = "torch" if name.startswith("torch") else "ext"
    if backend == "torch":
        w.torch_weight()  # build the int32 torch tensor now, not inside the timing
    return lambda: w.linear(x, None, backend)


def time_interleaved(fns: dict[str, list[Callable]], reps: int, cpu_time: bool) -> dict[str, float]:
    """Seconds per call (median of CPU times, or min of wall times); each rep calls every candidate once,
    on the next copy of its weights."""
    clock = time.thread_time if cpu_time else time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for name, calls in fns.items():  # warm-up: first touch, lazy setup
        calls[0]()
    for r in range(reps):
        for name, calls in fns.items():
            f = calls[r % len(calls)]
            t0 = clock()
            f()
            samples[name].append(clock() - t0)
    pick = statistics.median if cpu_time else min
    return {k: pick(v) for k, v in samples.items()}


def run(shapes, sparsities, batches, threads_list, names=("csr", "torch-csr", "bsr16", "torch-bsr16", "nm"),
        reps: int = 7, min_bytes: int = 128 << 20, seed: int = 0, log=print) -> dict:
    """The layer table: one row per (shape, sparsity, batch, threads, candidate)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    saved_threads = torch.get_num_threads()
    try:
        for out, inp in shapes:
            for s in sparsities:
                cands = candidates(out, inp, s, gen, tuple(names))
                pools = {k: _copies(w, max(1, min(256, math.ceil(min_bytes / max(nb, 1)))))
                         for k, (w, nb, _) in cands.items()}
                for batch in batches:
                    x = torch.randn(batch, inp, generator=gen)
                    for threads in threads_list:
                        torch.set_num_threads(threads)
                        fns = {k: [_call(k, w, x) for w in pool] for k, pool in pools.items()}
                        t = time_interleaved(fns, reps, cpu_time=threads == 1)
                        for k, sec in t.items():
                            rows.append({"out": out, "in": inp, "sparsity": s, "actual_sparsity": cands[k][2],
                                         "batch": batch, "threads": threads, "kernel": k, "ms": sec * 1e3,
                                         "bytes": cands[k][1], "gbs": cands[k][1] / sec / 1e9,
                                         "speedup": t["dense"] / sec})
                        log(f"  {out}x{inp} s={s:.2f} B={batch} t={threads}: "
                            + " ".join(f"{k}={t['dense'] / v:.2f}x" for k, v in t.items() if k != "dense")
                            + f" (dense {t['dense'] * 1e3:.2f} ms)")
                del pools, cands
    finally:
        torch.set_num_threads(saved_threads)
    return {"rows": rows, "break_even": break_even(rows)}


def break_even(rows: list[dict]) -> list[dict]:
    """Per (shape, batch, threads, kernel): the lowest sparsity from which the kernel is faster than dense
    at every higher measured sparsity (None = never)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kernel"] != "dense":
            groups.setdefault((r["out"], r["in"], r["batch"], r["threads"], r["kernel"]), []).append(r)
    out = []
    for (o, i, b, t, k), rs in groups.items():
        rs.sort(key=lambda r: r["sparsity"])
        be = None
        for r in reversed(rs):
            if r["speedup"] < 1:
                break
            be = r["sparsity"]
        out.append({"out": o, "in": i, "batch": b, "threads": t, "kernel": k, "break_even": be})
    return out


def format_table(result: dict) -> str:
    """Speedup vs dense, one line per (shape, batch, threads, kernel), sparsities as columns."""
    rows = result["rows"]
    sps = sorted({r["sparsity"] for r in rows})
    be = {(b["out"], b["in"], b["batch"], b["threads"], b["kernel"]): b["break_even"] for b in result["break_even"]}
    head = f"{'shape':>11} {'B':>4} {'thr':>3} {'kernel':<12}" + "".join(f"{round(s * 100):>8}%" for s in sps)
    lines = [head + "  break-even", "-" * (len(head) + 12)]
    keys = []
    for r in rows:
        k = (r["out"], r["in"], r["batch"], r["threads"], r["kernel"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        o, i, b, t, name = k
        cells = {r["sparsity"]: r for r in rows if (r["out"], r["in"], r["batch"], r["threads"], r["kernel"]) == k}
        if name == "dense":
            vals = "".join(f"{cells[s]['ms']:>7.2f}ms" if s in cells else f"{'':>9}" for s in sps)
            lines.append(f"{o:>5}x{i:<5} {b:>4} {t:>3} {'dense (ms)':<12}" + vals)
            continue
        vals = "".join(f"{cells[s]['speedup']:>8.2f}x" if s in cells else f"{'':>9}" for s in sps)
        e = be.get(k)
        lines.append(f"{o:>5}x{i:<5} {b:>4} {t:>3} {name:<12}" + vals + f"  {'never' if e is None else f'{e:.0%}'}")
    return "\n".join(lines)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    import os

    from . import extension_isa

    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, kernels: "
            f"{extension_isa() or 'not built (torch fallback)'}")
