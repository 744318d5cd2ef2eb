"""The torch-free edge runtime vs PyTorch: installed size, peak memory, latency, file size.

    nice .venv/bin/python benchmarks/bench_edge.py [--quick]

Models: the digits MLP (models.MLP 64-256-256-10, trained, magnitude-pruned to 90%, fine-tuned with its
masks) and the byte-level GPT (models.gpt.GPT default config: 4 layers, width 128, context 128; random
weights magnitude-pruned to 50% - speed does not depend on the values). Each measurement runs in a fresh
subprocess (this file with --worker), so peak memory (ru_maxrss) is that of one runtime alone:

* edge:  ``import sparsetorch.edge``; load the .spt file; run (torch must never be imported: checked)
* torch: ``import torch, sparsetorch``; build the model; ``sparsetorch.load`` the checkpoint; run eagerly

All runtimes use one thread (OMP/OpenBLAS/MKL_NUM_THREADS=1): the benchmark machine is shared.

Latency: median wall time per call (MLP batch 1 and 256). GPT: ``EdgeModel.generate`` (KV cache) vs
greedy decoding with the torch model, which has no KV cache and re-runs the whole prefix per token (the
usual way to decode it); tokens/s for 16 prompt bytes + 64 new ones. Llama: a transformers LlamaForCausalLM
from a config (random weights, 4 blocks x 512 wide, MLP 1408, 8 query / 2 key-value heads, vocabulary 4096)
with every block projection magnitude-pruned to 70%: transformers' greedy ``generate`` (KV cache) vs
``EdgeModel.generate`` from fp32, bf16 and int8 files (weights held as bitmask + values, on the compiled
decode kernels); 16 prompt tokens + 64 new ones. Installed size: the files of each
distribution (importlib.metadata) with its required dependencies. Writes benchmarks/results/bench_edge.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GPT_PROMPT, GPT_NEW = bytes(range(65, 81)), 64
LLAMA = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=4096, max_position_embeddings=256, eos_token_id=None)
LLAMA_PROMPT, LLAMA_SPARSITY = list(range(100, 116)), 0.7


# -- installed size ----------------------------------------------------------------------------------------
def dist_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            total += path.stat().st_size
    return total


def closure(name: str, seen: set | None = None) -> set[str]:
    """``name`` and its required (non-extra) dependencies that are installed, recursively."""
    from packaging.requirements import Requirement

    seen = set() if seen is None else seen
    key = metadata.distribution(name).metadata["Name"].lower()
    if key in seen:
        return seen
    seen.add(key)
    for spec in metadata.requires(name) or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            closure(req.name, seen)
        except metadata.PackageNotFoundError:
            pass
    return seen


def installed_sizes() -> dict:
    out = {}
    for label, roots in (("edge runtime (numpy + safetensors)", ["numpy", "safetensors"]), ("torch", ["torch"])):
        names: set[str] = set()
        for r in roots:
            closure(r, names)
        out[label] = {"distributions": sorted(names), "bytes": sum(dist_bytes(n) for n in names)}
    return out


# -- workers (run in fresh interpreters) ----------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(kind: str, path: str, backend: str, quick: bool) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    reps = 20 if quick else 200
    g = np.random.default_rng(0)
    result: dict = {}
    if kind.startswith("edge"):
        import sparsetorch.edge as edge

        model = edge.load(path, backend=backend)
        result["load_s"] = time.perf_counter() - t0
        if kind == "edge-mlp":
            x1, x256 = g.random((1, 64), np.float32), g.random((256, 64), np.float32)
            result["batch1_s"] = _median_time(lambda: model(x1), reps)
            result["batch256_s"] = _median_time(lambda: model(x256), max(5, reps // 4))
        elif kind == "edge-llama":
            result["generate_s"] = _median_time(lambda: model.generate(LLAMA_PROMPT, GPT_NEW), 3 if quick else 5)
            result["tokens"] = model.generate(LLAMA_PROMPT, GPT_NEW)
        else:
            result["generate_s"] = _median_time(lambda: model.generate(GPT_PROMPT, GPT_NEW), 3 if quick else 5)
        result["torch_imported"] = "torch" in sys.modules
    else:
        import torch

        import sparsetorch

        if kind == "torch-mlp":
            from sparsetorch.models import MLP

            model = sparsetorch.load(MLP((64, 256, 256, 10)), path).eval()
            x1, x256 = torch.from_numpy(g.random((1, 64), np.float32)), torch.from_numpy(g.random((256, 64), np.float32))
            result["load_s"] = time.perf_counter() - t0
            with torch.no_grad():
                result["batch1_s"] = _median_time(lambda: model(x1), reps)
                result["batch256_s"] = _median_time(lambda: model(x256), max(5, reps // 4))
        elif kind == "torch-llama":
            from safetensors.torch import load_file

            model = llama_model()
            model.load_state_dict(load_file(path), strict=False)  # the rotary buffers are rebuilt, not saved
            result["load_s"] = time.perf_counter() - t0
            prompt = torch.tensor([LLAMA_PROMPT])

            def gen():
                with torch.no_grad():
                    return model.generate(prompt, max_new_tokens=GPT_NEW, do_sample=False)
            result["generate_s"] = _median_time(gen, 3 if quick else 5)
            result["tokens"] = gen()[0].tolist()
        else:
            from sparsetorch.export.edge_gpt import torch_generate
            from sparsetorch.models.gpt import GPT

            model = sparsetorch.load(GPT(), path).eval()
            result["load_s"] = time.perf_counter() - t0
            result["generate_s"] = _median_time(lambda: torch_generate(model, GPT_PROMPT, GPT_NEW), 3 if quick else 5)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:  # the same peak from the kernel's per-process counter (Linux), as a cross-check
        status = Path("/proc/self/status").read_text()
        result["vm_hwm_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return result


# Linux carries ru_maxrss across fork+exec: a worker started from this (torch-sized) process would report
# at least this process's peak. A bare interpreter in between starts the worker from ~10 MiB instead.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
# one thread everywhere (BLAS, torch, the compiled kernels): the machine is shared, timings stay comparable
_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_worker(kind: str, path: Path, backend: str = "auto", quick: bool = False) -> dict:
    cmd = [sys.executable, "-c", _LAUNCH, sys.executable, __file__, "--worker", kind, str(path), backend]
    out = subprocess.run(cmd + (["--quick"] if quick else []), check=True, capture_output=True, text=True,
                         timeout=1800, env={**os.environ, **_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- models -----------------------------------------------------------------------------------------------------
def llama_model():
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def make_llama(tmp: Path) -> dict:
    """The pruned Llama as a plain safetensors state dict (for the torch worker) and as fp32 / bf16 / int8 edge
    files; sizes and logit errors against torch."""
    import warnings

    import numpy as np
    import torch
    from safetensors.torch import save_file

    import sparsetorch
    import sparsetorch.edge as edge
    from sparsetorch.core.masks import remove_masks

    model = llama_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(model, LLAMA_SPARSITY, generator=torch.Generator().manual_seed(0))
    remove_masks(model)  # the pruned weights are zeros in place: torch runs the plain model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "llama.safetensors"))
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.numpy()
    info = {"checkpoint_bytes": (tmp / "llama.safetensors").stat().st_size,
            "dense_fp32_bytes": sum(p.numel() * 4 for p in model.parameters())}
    for values in ("fp32", "bf16", "int8"):
        sparsetorch.export_edge(model, ids[:, :8], tmp / f"llama-{values}.spt", values=values)
        got = edge.load(tmp / f"llama-{values}.spt")(ids.numpy())
        info[values] = {"bytes": (tmp / f"llama-{values}.spt").stat().st_size,
                        "max_rel_logit_error": float(np.abs(got - want).max() / np.abs(want).max())}
    return info


def make_models(tmp: Path, quick: bool) -> dict:
    import warnings

    import numpy as np
    import torch

    import sparsetorch
    import sparsetorch.edge as edge
    from sparsetorch.data.digits import load_digits_split
    from sparsetorch.models import MLP
    from sparsetorch.models.gpt import GPT
    from sparsetorch.recipes.training_loop import accuracy, fit

    data = load_digits_split(seed=0)
    torch.manual_seed(0)
    mlp = fit(MLP((64, 256, 256, 10)), data.x_train, data.y_train, epochs=5 if quick else 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(mlp, 0.9, generator=torch.Generator().manual_seed(0))
    fit(mlp, data.x_train, data.y_train, epochs=3 if quick else 10)
    info: dict = {"mlp": {"torch_accuracy": accuracy(mlp, data.x_test, data.y_test)}}
    sparsetorch.save(mlp, tmp / "mlp.safetensors")
    with torch.no_grad():
        want = mlp(data.x_test).numpy()
    for values in ("fp32", "int8"):
        sparsetorch.export_edge(mlp, data.x_test[:1], tmp / f"mlp-{values}.spt", values=values)
        got = edge.load(tmp / f"mlp-{values}.spt")(data.x_test.numpy())
        info["mlp"][values] = {"bytes": (tmp / f"mlp-{values}.spt").stat().st_size,
                               "accuracy": float((got.argmax(1) == data.y_test.numpy()).mean()),
                               "max_rel_logit_error": float(np.abs(got - want).max() / np.abs(want).max())}
    info["mlp"]["checkpoint_bytes"] = (tmp / "mlp.safetensors").stat().st_size
    info["mlp"]["dense_fp32_bytes"] = sum(p.numel() * 4 for p in mlp.parameters())

    torch.manual_seed(0)
    gpt = GPT().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsetorch.prune(gpt, 0.5, generator=torch.Generator().manual_seed(0))
    sparsetorch.save(gpt, tmp / "gpt.safetensors")
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = gpt(ids).numpy()
    info["gpt"] = {"checkpoint_bytes": (tmp / "gpt.safetensors").stat().st_size,
                   "dense_fp32_bytes": sum(p.numel() * 4 for p in gpt.parameters())}
    for values in ("fp32", "int8"):
        sparsetorch.export_edge(gpt, ids[:1, :8], tmp / f"gpt-{values}.spt", values=values)
        got = edge.load(tmp / f"gpt-{values}.spt")(ids.numpy())
        info["gpt"][values] = {"bytes": (tmp / f"gpt-{values}.spt").stat().st_size,
                               "max_rel_logit_error": float(np.abs(got - want).max() / np.abs(want).max())}
    info["llama"] = make_llama(tmp)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and repetitions (a smoke run)")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "BACKEND"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_edge.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, quick=args.quick)))
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        info = make_models(tmp, args.quick)
        runs = {
            "mlp": {"torch": run_worker("torch-mlp", tmp / "mlp.safetensors", quick=args.quick),
                    "edge numpy": run_worker("edge-mlp", tmp / "mlp-fp32.spt", "numpy", args.quick),
                    "edge dense": run_worker("edge-mlp", tmp / "mlp-fp32.spt", "dense", args.quick),
                    "edge auto": run_worker("edge-mlp", tmp / "mlp-fp32.spt", "auto", args.quick),
                    "edge auto int8": run_worker("edge-mlp", tmp / "mlp-int8.spt", "auto", args.quick)},
            "gpt": {"torch (no KV cache)": run_worker("torch-gpt", tmp / "gpt.safetensors", quick=args.quick),
                    "edge numpy": run_worker("edge-gpt", tmp / "gpt-fp32.spt", "numpy", args.quick),
                    "edge dense": run_worker("edge-gpt", tmp / "gpt-fp32.spt", "dense", args.quick),
                    "edge auto": run_worker("edge-gpt", tmp / "gpt-fp32.spt", "auto", args.quick)},
            "llama": {"torch (KV cache)": run_worker("torch-llama", tmp / "llama.safetensors", quick=args.quick),
                      "edge numpy": run_worker("edge-llama", tmp / "llama-fp32.spt", "numpy", args.quick),
                      "edge dense": run_worker("edge-llama", tmp / "llama-fp32.spt", "dense", args.quick),
                      "edge auto": run_worker("edge-llama", tmp / "llama-fp32.spt", "auto", args.quick),
                      "edge auto bf16": run_worker("edge-llama", tmp / "llama-bf16.spt", "auto", args.quick),
                      "edge auto int8": run_worker("edge-llama", tmp / "llama-int8.spt", "auto", args.quick)},
        }
    sizes = installed_sizes()
    command = "nice .venv/bin/python benchmarks/bench_edge.py" + (" --quick" if args.quick else "")
    from sparsetorch.edge.linear import compiled_kernels

    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"command: {command}\nmachine: {machine}, 1 thread per runtime\ndate: {started:%Y-%m-%d %H:%M UTC}\n"
          f"compiled kernels: {'yes' if compiled_kernels() is not None else 'no'}\n")
    torch_size = sizes["torch"]["bytes"]
    print(f"{'installed size':<40}{'MiB':>10}{'vs torch':>10}")
    for label, s in sizes.items():
        print(f"{label:<40}{s['bytes'] / 2**20:>10.1f}{s['bytes'] / torch_size:>10.3f}   {', '.join(s['distributions'])}")
    for name, rows in runs.items():
        base = rows[next(iter(rows))]
        print()
        if name == "mlp":
            print(f"digits MLP 90% sparse (torch acc {info['mlp']['torch_accuracy']:.4f}, edge fp32 "
                  f"{info['mlp']['fp32']['accuracy']:.4f}, int8 {info['mlp']['int8']['accuracy']:.4f})")
            print(f"{'runtime':<24}{'peak RSS MiB':>13}{'x torch':>8}{'batch1 us':>11}{'speedup':>8}"
                  f"{'batch256 us':>13}{'speedup':>8}{'load ms':>9}")
            for label, r in rows.items():
                print(f"{label:<24}{r['peak_rss_mib']:>13.1f}{r['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}"
                      f"{r['batch1_s'] * 1e6:>11.1f}{base['batch1_s'] / r['batch1_s']:>8.2f}"
                      f"{r['batch256_s'] * 1e6:>13.1f}{base['batch256_s'] / r['batch256_s']:>8.2f}{r['load_s'] * 1e3:>9.1f}")
        else:
            if name == "gpt":
                print(f"byte-level GPT 50% sparse: {len(GPT_PROMPT)} prompt bytes + {GPT_NEW} generated, greedy")
            else:
                same = all(r["tokens"] == base["tokens"] for label, r in rows.items() if "bf16" not in label
                           and "int8" not in label)
                print(f"Llama {LLAMA['num_hidden_layers']}x{LLAMA['hidden_size']} {LLAMA_SPARSITY:.0%} sparse: "
                      f"{len(LLAMA_PROMPT)} prompt tokens + {GPT_NEW} generated, greedy; fp32 tokens identical to "
                      f"torch: {same}")
            print(f"{'runtime':<24}{'peak RSS MiB':>13}{'x torch':>8}{'tokens/s':>10}{'speedup':>8}{'load ms':>9}")
            for label, r in rows.items():
                print(f"{label:<24}{r['peak_rss_mib']:>13.1f}{r['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}"
                      f"{GPT_NEW / r['generate_s']:>10.1f}{base['generate_s'] / r['generate_s']:>8.2f}{r['load_s'] * 1e3:>9.1f}")
        print(f"{'file':<24}{'KiB':>10}{'x checkpoint':>14}{'max rel logit err':>19}")
        m = info[name]
        print(f"{'dense fp32 params':<24}{m['dense_fp32_bytes'] / 1024:>10.1f}{m['dense_fp32_bytes'] / m['checkpoint_bytes']:>14.2f}")
        print(f"{'sparsetorch.save':<24}{m['checkpoint_bytes'] / 1024:>10.1f}{1:>14.2f}")
        for values in [v for v in ("fp32", "bf16", "int8") if v in m]:
            print(f"{'edge ' + values:<24}{m[values]['bytes'] / 1024:>10.1f}{m[values]['bytes'] / m['checkpoint_bytes']:>14.2f}"
                  f"{m[values]['max_rel_logit_error']:>19.2e}")
    assert not any(r.get("torch_imported") for rows in runs.values() for r in rows.values()), "edge imported torch"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"command": command, "machine": machine, "date": started.isoformat(), "installed": sizes,
                   "models": info, "runs": runs}, fh, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
