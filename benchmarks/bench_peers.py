"""Peer runtimes side by side: sparsetorch's CSR kernel vs onnxruntime vs DeepSparse, one sparse Linear, 1 thread.

    nice .venv/bin/python benchmarks/bench_peers.py          # a few minutes on a busy 2-core VM
    ... --reps 31 --batches 1,64 --ds-python .venv-peers-ds/bin/python

One 4096x4096 Linear, W ~ N(0, 0.02^2) pruned to 90% with a random mask (seed 0), batch 1 and 64, 1 thread:
* dense torch fp32 ``F.linear`` (the reference every ratio divides),
* sparsetorch ``sparse_linear(x, pack(w, "csr"))``,
* onnxruntime on an ONNX Gemm holding the same pruned weight dense (zeros included: what a user who exports
  a pruned model to ONNX gets), intra_op_num_threads=1,
* DeepSparse 1.8 (num_cores=1) on the same ONNX file, in its own venv and process (it needs onnx<1.15);
  skipped with a note when that venv is missing.

Timing (as benchmarks/bench_kernels.py): in-process candidates run interleaved call by call, weights rotated
across copies totalling >= 128 MB (ORT: one session per copy), median CPU time of the calling thread.
DeepSparse keeps its weights inside its engine, so its process flushes the cache (writes a 96 MB buffer)
before every call instead, interleaved with its own dense torch/numpy call timed the same way; its ratio
is against the dense time measured in that same process (see the "ds_dense_kind" field).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT, IN, SPARSITY = 4096, 4096, 0.9
FLUSH_BYTES = 96 << 20


def _make_onnx(w, path: str) -> None:
    """Y[B, out] = Gemm(X[B, in], W[out, in], transB=1), batch dimension symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    wt = numpy_helper.from_array(w.numpy(), name="W")
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], transB=1)
    graph = helper.make_graph([node], "sparse_linear", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                              ["B", w.shape[1]])], [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                              ["B", w.shape[0]])], initializer=[wt])
    # opset 13 / IR 7 so that the older onnx (<1.15) in DeepSparse's venv reads it too
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _ds_worker(path: str, batches: list[int], reps: int) -> dict:
    """Runs in DeepSparse's venv: per batch, engine vs dense interleaved, cache flushed before each call."""
    import numpy as np
    from deepsparse import compile_model

    try:
        import torch

        torch.set_num_threads(1)
        dense_kind = f"torch {torch.__version__} F.linear"
    except ImportError:
        torch = None
        dense_kind = f"numpy {np.__version__} matmul (torch not installed in this venv)"
    import onnx
    from onnx import numpy_helper

    w = numpy_helper.to_array(onnx.load(path).graph.initializer[0]).copy()
    wt = torch.from_numpy(w) if torch is not None else None
    flush = np.zeros(FLUSH_BYTES // 8)
    rng = np.random.default_rng(0)
    out = {"dense_kind": dense_kind, "rows": []}
    for b in batches:
        engine = compile_model(path, batch_size=b, num_cores=1)
        x = rng.standard_normal((b, w.shape[1]), dtype=np.float32)
        xt = torch.from_numpy(x) if torch is not None else None
        fns = {"deepsparse": lambda: engine([x]),
               "dense": (lambda: torch.nn.functional.linear(xt, wt)) if torch is not None else (lambda: x @ w.T)}
        y_ds = engine([x])[0]
        y_ref = x.astype(np.float64) @ w.T.astype(np.float64)
        samples = {k: {"cpu": [], "wall": []} for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                flush += 1.0  # evict weights: every call reads them from DRAM
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                c1, t1 = time.process_time(), time.perf_counter()
                samples[k]["cpu"].append(c1 - c0)
                samples[k]["wall"].append(t1 - t0)
        row = {"batch": b, "max_abs_err": float(np.abs(y_ds - y_ref).max())}
        for k, s in samples.items():
            row[k] = {"cpu_ms": statistics.median(s["cpu"]) * 1e3, "wall_ms": statistics.median(s["wall"]) * 1e3}
        out["rows"].append(row)
        del engine
    import deepsparse

    out["version"] = deepsparse.__version__
    return out


def _run_deepsparse(ds_python: str, path: str, batches: list[int], reps: int) -> dict:
    if not Path(ds_python).exists():
        return {"skipped": f"{ds_python} not found (create it: python3.11 -m venv .venv-peers-ds && "
                           ".venv-peers-ds/bin/pip install deepsparse==1.8.0 'onnx<1.15')"}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NM_NUM_CORES="1")
    cmd = [ds_python, __file__, "--ds-worker", path, "--batches", ",".join(map(str, batches)), "--reps", str(reps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        return {"skipped": f"DeepSparse worker failed (rc {p.returncode}): {p.stderr.strip()[-600:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _time_in_process(w, batches: list[int], reps: int, onnx_bytes: bytes, min_bytes: int = 128 << 20) -> list[dict]:
    """dense / csr / ort interleaved per call, weights rotated over >= min_bytes; median thread CPU time."""
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from sparsetorch.kernels import pack, sparse_linear

    csr = pack(w, "csr")
    n_dense = max(1, math.ceil(min_bytes / (w.numel() * 4)))
    n_csr = max(1, math.ceil(min_bytes / csr.nbytes))
    dense = [w.clone() for _ in range(n_dense)]
    csrs = [pack(w, "csr") for _ in range(n_csr)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no pool spinning between calls
    sessions = [ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"]) for _ in range(n_dense)]
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batches:
        x = torch.randn(b, w.shape[1], generator=gen)
        xn = x.numpy()
        ref = (x.double() @ w.double().T)
        err = {"csr": (sparse_linear(x, csrs[0]).double() - ref).abs().max().item(),
               "onnxruntime": (torch.from_numpy(sessions[0].run(None, {"X": xn})[0]).double() - ref).abs().max().item(),
               "dense": (F.linear(x, dense[0]).double() - ref).abs().max().item()}
        fns = {"dense": [lambda wd=wd: F.linear(x, wd) for wd in dense],
               "csr": [lambda c=c: sparse_linear(x, c) for c in csrs],
               "onnxruntime": [lambda s=s: s.run(None, {"X": xn}) for s in sessions]}
        samples = {k: {"cpu": [], "wall": []} for k in fns}
        for k, calls in fns.items():  # warm-up: first touch, lazy setup
            for f in calls:
                f()
        for r in range(reps):
            for k, calls in fns.items():
                f = calls[r % len(calls)]
                c0, t0 = time.thread_time(), time.perf_counter()
                f()
                c1, t1 = time.thread_time(), time.perf_counter()
                samples[k]["cpu"].append(c1 - c0)
                samples[k]["wall"].append(t1 - t0)
        for k, s in samples.items():
            rows.append({"batch": b, "runtime": k, "cpu_ms": statistics.median(s["cpu"]) * 1e3,
                         "wall_ms": statistics.median(s["wall"]) * 1e3, "max_abs_err": err[k],
                         "copies": len(fns[k])})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--ds-python", default=str(ROOT.parent / ".venv-peers-ds" / "bin" / "python"))
    ap.add_argument("--ds-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_peers.json"))
    args = ap.parse_args(argv)
    batches = [int(v) for v in args.batches.split(",")]
    if args.ds_worker:  # inside DeepSparse's venv: no sparsetorch here
        print(json.dumps(_ds_worker(args.ds_worker, batches, args.reps)))
        return 0

    import onnxruntime as ort
    import torch

    from sparsetorch.kernels import microbench as bench

    torch.set_num_threads(1)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    lines = [f"# {command}", f"# {bench.machine()}, onnxruntime {ort.__version__}",
             f"# {when}; load average before: {load_before:.2f}"]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen) * 0.02
    w = w * (torch.rand(OUT, IN, generator=gen) >= SPARSITY)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "linear_4096_s90.onnx")
        _make_onnx(w, path)
        onnx_bytes = Path(path).read_bytes()
        rows = _time_in_process(w, batches, args.reps, onnx_bytes)
        ds = _run_deepsparse(args.ds_python, path, batches, args.reps)
    load_after = os.getloadavg()[0]

    dense_ms = {r["batch"]: r["cpu_ms"] for r in rows if r["runtime"] == "dense"}
    csr_ms = {r["batch"]: r["cpu_ms"] for r in rows if r["runtime"] == "csr"}
    for r in rows:
        r["vs_dense"] = dense_ms[r["batch"]] / r["cpu_ms"]
    if "rows" in ds:
        for d in ds["rows"]:
            # DeepSparse's work runs on its own threads: process CPU time counts them; its ratio uses the dense
            # call timed in the same process under the same cache flush
            rows.append({"batch": d["batch"], "runtime": "deepsparse", "cpu_ms": d["deepsparse"]["cpu_ms"],
                         "wall_ms": d["deepsparse"]["wall_ms"], "max_abs_err": d["max_abs_err"],
                         "vs_dense": d["dense"]["cpu_ms"] / d["deepsparse"]["cpu_ms"],
                         "vs_dense_wall": d["dense"]["wall_ms"] / d["deepsparse"]["wall_ms"],
                         "ds_dense_cpu_ms": d["dense"]["cpu_ms"], "ds_dense_wall_ms": d["dense"]["wall_ms"],
                         "ds_dense_kind": ds["dense_kind"]})
    csr_ratio = {r["batch"]: r["vs_dense"] for r in rows if r["runtime"] == "csr"}
    for r in rows:
        # ours / peer: ratio of ratios, so each peer is judged against the dense run it was timed beside
        r["ours_over_peer"] = csr_ratio[r["batch"]] / r["vs_dense"]

    table = [f"\n4096x4096 Linear, 90% unstructured (random mask), 1 thread; ms = median CPU time per call; "
             f"x dense = dense torch fp32 ms / runtime ms; ours/peer = csr's x dense / peer's x dense.",
             f"{'B':>3} {'runtime':<13} {'ms':>8} {'wall ms':>8} {'x dense':>8} {'ours/peer':>9} {'max err':>9}"]
    for b in batches:
        for r in [r for r in rows if r["batch"] == b]:
            table.append(f"{b:>3} {r['runtime']:<13} {r['cpu_ms']:8.3f} {r['wall_ms']:8.3f} {r['vs_dense']:8.2f} "
                         f"{r['ours_over_peer']:9.2f} {r['max_abs_err']:9.1e}")
    notes = [f"load average after: {load_after:.2f} (2 cores shared with other jobs; CPU time is robust to "
             "time-slicing, wall time is not)",
             f"dense/csr/onnxruntime: one process, interleaved, weights rotated over >=128 MB "
             f"(dense {next(r['copies'] for r in rows if r['runtime'] == 'dense')} copies / ORT sessions, "
             f"csr {next(r['copies'] for r in rows if r['runtime'] == 'csr')} copies)."]
    if "rows" in ds:
        notes.append(f"deepsparse {ds['version']} (num_cores=1): own process, 96 MB cache flush before each call, "
                     f"process CPU time; its x dense is vs {ds['dense_kind']} timed interleaved in that process "
                     "(dense there: " + ", ".join(f"B={d['batch']} {d['dense']['cpu_ms']:.2f} ms"
                                                   for d in ds["rows"]) + ").")
    else:
        notes.append(f"deepsparse: not measured: {ds['skipped']}")
    text = "\n".join(lines + table + ["# " + n for n in notes])
    print("\n".join(table + ["# " + n for n in notes]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": bench.machine(), "onnxruntime": ort.__version__,
                               "date": when, "load_before": load_before, "load_after": load_after,
                               "shape": [OUT, IN], "sparsity": SPARSITY, "threads": 1, "reps": args.reps,
                               "rows": rows, "deepsparse": ds, "notes": notes}, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
