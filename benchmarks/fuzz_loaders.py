"""Seeded mutation fuzzer for sparsetorch's file loaders (issue #20): hostile files must fail with a clean
SparsityError, never crash, hang or half-load.

    python benchmarks/fuzz_loaders.py --cases 2000 [--loaders edge,cli_info] [--seed 0] [--timeout 20]

For each loader a valid seed file is written with the library's own writers, then each case (loader, seed)
applies one seeded mutation (byte flips, truncation, safetensors-header edits, sparsetorch/edge metadata
edits, index-value edits, size claims) and runs the load (plus a forward). Cases run in worker
subprocesses, many per worker; a worker that dies (segfault) or stops answering (hang) is recorded against
the case it was running and a new one resumes after it. Prints one table row per loader and writes JSON
to benchmarks/results/fuzz_loaders.json. tests/test_hostile_files.py::test_fuzz_* runs a short fixed budget.

Outcomes: ok (loaded and ran: a mutation of values only, say), clean (SparsityError), other (another
exception type: a bug, listed by type), partial (the load raised but had already changed the target
model or optimizer), crash (worker killed by a signal), hang (no answer within --timeout seconds).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOADERS = ("save_masked", "save_inference", "edge", "shrunk", "training_state", "cli_info")
MUTATIONS = ("flip", "truncate", "st_header", "meta_edit", "index_values", "size_claim")
HOSTILE_INTS = (-1, -2, -1000, 0, 1, 63, 64, 65, 30000, 32767, 65535, 65536, 2**31 - 1, 2**31, -2**31,
                2**32, 2**53, 2**62, -2**62)
ST_INT = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U16": np.uint16,
          "U32": np.uint32, "U64": np.uint64}
ST_DTYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "BOOL", "XYZ")


# -- models and seed files (same builders in the parent and the workers) ----------------------------------------
def _mlp():
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    return model


def _masked():
    import sparsetorch
    from sparsetorch.models import MLP
    import torch
    torch.manual_seed(0)
    model = MLP((64, 48, 10))
    sparsetorch.prune(model, 0.8)
    return model


def _shrink_base():
    import sparsetorch
    from sparsetorch.models import MLP
    import torch
    torch.manual_seed(0)
    model = MLP((64, 48, 32, 10))
    sparsetorch.prune(model, 0.5, pattern="channel", scope="layer")
    return model


def build_target(loader: str):
    """The fresh model (and optimizer) a loader loads into."""
    import torch
    import sparsetorch
    if loader == "save_masked":
        return _masked(), None
    if loader == "save_inference":
        return sparsetorch.to_inference(_mlp().eval(), torch.randn(4, 64), budget_s=0.005, fuse="always"), None
    if loader == "training_state":
        model = sparsetorch.to_sparse_training(_mlp(), 0.9)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return None, None


def write_seeds(folder: Path) -> dict[str, Path]:
    """One valid file (a folder for training_state) per loader, written by the library's own writers."""
    import torch
    import sparsetorch
    from sparsetorch.shrink import save_shrunk, shrink
    from sparsetorch.integrations import save_training_state
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.randn(4, 64)
    seeds = {"save_masked": sparsetorch.save(_masked(), folder / "masked.safetensors")}
    fast, _ = build_target("save_inference")
    seeds["save_inference"] = sparsetorch.save(fast, folder / "inference.safetensors")
    sparsetorch.export_edge(_mlp().eval(), x[:1], folder / "model.spt")
    seeds["edge"] = folder / "model.spt"
    seeds["shrunk"] = save_shrunk(shrink(_shrink_base().eval(), x), folder / "shrunk.safetensors")
    model, opt = build_target("training_state")
    model(x).sum().backward()
    opt.step()
    seeds["training_state"] = save_training_state(model, folder / "ckpt", opt, extra={"step": 1})
    seeds["cli_info"] = seeds["save_masked"]
    return {k: Path(v) for k, v in seeds.items()}


# -- mutations --------------------------------------------------------------------------------------------------
def _split(data: bytes):
    if len(data) < 8:
        return None
    n = struct.unpack("<Q", data[:8])[0]
    if n > len(data) - 8:
        return None
    try:
        return json.loads(data[8:8 + n]), data[8 + n:]
    except ValueError:
        return None


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One seeded mutation of a safetensors file's bytes: (new bytes, what was done)."""
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    parsed = _split(data)
    if kind == "flip" or parsed is None:
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
        return bytes(buf), "flip"
    if kind == "truncate":
        return data[:int(rng.integers(len(data)))], "truncate"
    header, body = parsed
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "st_header" and names:
        name = names[int(rng.integers(len(names)))]
        entry = header[name]
        what = ("shape", "dtype", "offsets")[int(rng.integers(3))]
        if what == "shape" and entry.get("shape"):
            i = int(rng.integers(len(entry["shape"])))
            entry["shape"][i] = int(rng.choice([0, -1, 2**31, 2**40, entry["shape"][i] * 2 + 1]))
        elif what == "dtype":
            entry["dtype"] = ST_DTYPES[int(rng.integers(len(ST_DTYPES)))]
        else:
            a, b = entry["data_offsets"]
            entry["data_offsets"] = [a, int(rng.choice([b + 8, max(a, b - 8), 2**40, a]))]
        return _join(header, body), f"st_header:{name}:{what}"
    if kind == "index_values" and names:
        ints = [k for k in names if header[k]["dtype"] in ST_INT and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
        if ints:
            name = ints[int(rng.integers(len(ints)))]
            dtype = np.dtype(ST_INT[header[name]["dtype"]]).newbyteorder("<")
            a, b = header[name]["data_offsets"]
            arr = np.frombuffer(body[a:b], dtype).copy()
            value = int(rng.choice(HOSTILE_INTS))
            sel = rng.random(arr.size) < (1.0 if rng.random() < 0.3 else 0.1)
            sel[int(rng.integers(arr.size))] = True
            arr[sel] = np.array(value).astype(dtype)  # wraps: -1 in uint16 is 65535
            body = body[:a] + arr.tobytes() + body[b:]
            return _join(header, body), f"index_values:{name}={value}"
    meta = header.get("__metadata__") or {}
    keys = [k for k, v in meta.items() if isinstance(v, str) and v[:1] in "{["]
    if keys:
        key = keys[int(rng.integers(len(keys)))]
        doc = json.loads(meta[key])
        leaves = [(p, v) for p, v in _leaves(doc)]
        if kind == "size_claim":
            nums = [(p, v) for p, v in leaves if isinstance(v, int) and not isinstance(v, bool)]
            if nums:
                p, v = nums[int(rng.integers(len(nums)))]
                _set(doc, p, int(v) * int(rng.choice([2**10, 2**20, 2**31])) + 1)
                meta[key] = json.dumps(doc)
                return _join(header, body), f"size_claim:{'/'.join(map(str, p))}"
        if leaves:
            p, v = leaves[int(rng.integers(len(leaves)))]
            choices = [None, -1, 0, 2**62, 65535, "x", "csr", "bitmask", "int8", [1, 2], {}, 1.5, True]
            _set(doc, p, choices[int(rng.integers(len(choices)))])
            meta[key] = json.dumps(doc)
            return _join(header, body), f"meta_edit:{'/'.join(map(str, p))}"
    return mutate(data, rng)  # nothing to edit that way: another kind


def state_index_edit(template, rng: np.random.Generator, path: Path) -> str:
    """An index edit below the file encoding (which compresses integer tensors, so raw byte edits mostly
    fail its decoding): set values of one integer buffer of the model, then save with sparsetorch.save,
    as a hostile writer would. Returns what was done."""
    import torch
    import sparsetorch
    model = copy.deepcopy(template)
    state = model.state_dict()
    ints = sorted(k for k, v in state.items() if not v.is_floating_point() and v.numel())
    if not ints:
        sparsetorch.save(model, path)
        return "state_index:none"
    key = ints[int(rng.integers(len(ints)))]
    t = state[key].clone()
    info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
    value = int(rng.choice(HOSTILE_INTS))
    if info is not None:
        value = int(np.array(value).astype(np.dtype(str(t.dtype).replace("torch.", ""))))
    flat = t.view(-1)
    sel = torch.from_numpy(rng.random(flat.numel()) < (1.0 if rng.random() < 0.3 else 0.1))
    sel[int(rng.integers(flat.numel()))] = True
    flat[sel] = value
    state[key].copy_(t)  # in place: load_state_dict now refuses such buffers, a hostile writer need not use it
    sparsetorch.save(model, path)
    return f"state_index:{key}={value}"


# -- running one case (in a worker) ------------------------------------------------------------------------------
def _snapshot(model, opt):
    import torch
    state = {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else {}
    if opt is not None:
        for i, s in enumerate(opt.state.values()):
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    state[f"opt{i}.{k}"] = v.clone()
        state["opt.lr"] = torch.tensor([g["lr"] for g in opt.param_groups])
    return state


def _same(a, b):
    import torch
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                        and torch.equal(a[k], b[k]) for k in a)


def run_case(loader: str, seed_path: Path, case_seed: int, work: Path, templates: dict,
             announce=lambda what: None) -> tuple[str, str]:
    """(outcome, detail) of one fuzz case; raises nothing (a crash kills the process)."""
    import torch
    import sparsetorch
    from sparsetorch.errors import SparsityError
    rng = np.random.default_rng([case_seed, LOADERS.index(loader)])
    if seed_path.is_dir():
        target = work / "case"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(seed_path, target)
        files = sorted(p for p in target.iterdir() if p.is_file())
        victim = files[int(rng.integers(len(files)))]
        data, what = mutate(victim.read_bytes(), rng)
        what = f"{victim.name}:{what}"
        victim.write_bytes(data)
    elif loader in ("save_masked", "save_inference") and rng.random() < 0.3:
        target, what = work / "case.safetensors", state_index_edit(templates[loader][0], rng, work / "case.safetensors")
    else:
        target = work / f"case{seed_path.suffix}"
        data, what = mutate(seed_path.read_bytes(), rng)
        target.write_bytes(data)
    announce(what)  # before running: a crash is reported with the mutation
    model = opt = None
    if loader in templates:
        model, opt = copy.deepcopy(templates[loader])
        if opt is not None:  # deepcopy of (model, opt) keeps the optimizer pointing at the copied params
            pass
    before = _snapshot(model, opt)
    x = torch.randn(3, 64)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), torch.no_grad():
            if loader in ("save_masked", "save_inference"):
                sparsetorch.load(model, target)
                model(x)
            elif loader == "edge":
                import sparsetorch.edge as edge
                edge.load(target)(x.numpy())
            elif loader == "shrunk":
                from sparsetorch.shrink import load_shrunk
                load_shrunk(target, _shrink_base)(x)
            elif loader == "training_state":
                from sparsetorch.integrations import load_training_state
                load_training_state(model, target, opt)
                model(x)
            elif loader == "cli_info":
                from sparsetorch.cli.main import main
                rc = main(["info", str(target)])
                if rc:
                    return "clean", what
    except SparsityError:
        if model is not None and not _same(before, _snapshot(model, opt)):
            return "partial", what
        return "clean", what
    except SystemExit as exc:
        return ("clean" if exc.code else "ok"), what
    except Exception as exc:  # noqa: BLE001 - the point is to see which
        return f"other:{type(exc).__name__}", f"{what}: {str(exc)[:200]}"
    return "ok", what


def worker(seeds: dict[str, str]) -> None:
    """Read 'loader case_seed' lines from stdin; answer 'BEGIN id' then 'END id outcome\\tdetail' per case."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import warnings
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    templates = {}
    work = Path(tempfile.mkdtemp(prefix="fuzz_worker_"))
    try:
        for line in sys.stdin:
            loader, case = line.split()
            if loader not in templates and build_target(loader)[0] is not None:
                templates[loader] = build_target(loader)
            print(f"BEGIN {loader} {case}", flush=True)
            outcome, detail = run_case(loader, Path(seeds[loader]), int(case), work, templates,
                                       lambda what: print(f"WHAT {what.replace(chr(10), ' ')}", flush=True))
            print(f"END {loader} {case} {outcome}\t{detail.replace(chr(10), ' ')}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the parent: batches cases to workers, survives their crashes -----------------------------------------------
def run_cases(seeds: dict[str, Path], cases: list[tuple[str, int]], timeout: float = 20.0) -> list[dict]:
    """Run (loader, case_seed) cases in worker subprocesses; one record per case, in order."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "src")) if p),
           "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "0"}
    arg = json.dumps({k: str(v) for k, v in seeds.items()})
    results: list[dict] = []
    todo = list(cases)
    while todo:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", arg], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1)
        proc.stdin.write("".join(f"{l} {c}\n" for l, c in todo))
        proc.stdin.close()
        current, startup, what = None, True, ""
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda out=proc.stdout: [lines.put(l) for l in iter(out.readline, "")] + [lines.put("")],
                         daemon=True).start()
        while True:
            limit = timeout + (120 if startup else 0)  # the first case pays for importing torch
            try:
                line = lines.get(timeout=limit)
            except queue.Empty:
                line = None
            if line is None:  # no answer in time
                proc.kill()
                proc.wait()
                if current is not None:
                    results.append({"loader": current[0], "seed": current[1], "outcome": "hang", "detail": what})
                    todo.pop(0)
                break
            if line == "":  # the worker died
                rc = proc.wait()
                if current is not None:
                    results.append({"loader": current[0], "seed": current[1], "outcome": "crash",
                                    "detail": f"exit {rc}: {what}"})
                    todo.pop(0)
                elif rc:
                    raise RuntimeError(f"fuzz worker failed to start (exit {rc})")
                break
            parts = line.rstrip("\n").split(" ", 3)
            if parts[0] == "WHAT":
                what = line.rstrip("\n")[5:]
            elif parts[0] == "BEGIN":
                what = ""
                current, startup = (parts[1], int(parts[2])), False
            elif parts[0] == "END":
                outcome, _, detail = parts[3].partition("\t")
                results.append({"loader": parts[1], "seed": int(parts[2]), "outcome": outcome, "detail": detail})
                todo.pop(0)
                current = None
        # the crashed/hung case was recorded; the next worker resumes after it
    return results


def summarize(results: list[dict]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for r in results:
        row = table.setdefault(r["loader"], {"cases": 0, "ok": 0, "clean": 0, "other": 0, "partial": 0,
                                             "crash": 0, "hang": 0, "other_types": {}, "bad_seeds": []})
        row["cases"] += 1
        kind = r["outcome"].split(":")[0]
        row[kind] += 1
        if kind == "other":
            t = r["outcome"].split(":", 1)[1]
            row["other_types"][t] = row["other_types"].get(t, 0) + 1
        if kind in ("crash", "hang", "partial", "other") and len(row["bad_seeds"]) < 20:
            row["bad_seeds"].append({"seed": r["seed"], "outcome": r["outcome"], "detail": r["detail"][:300]})
    return table


def print_table(table: dict[str, dict]) -> None:
    cols = ("cases", "ok", "clean", "other", "partial", "crash", "hang")
    print(f"{'loader':<16}" + "".join(f"{c:>9}" for c in cols) + "  other types")
    for loader, row in table.items():
        print(f"{loader:<16}" + "".join(f"{row[c]:>9}" for c in cols) + "  " +
              ", ".join(f"{k} {v}" for k, v in sorted(row["other_types"].items())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=500, help="cases per loader")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_loaders.json"))
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    loaders = [l for l in args.loaders.split(",") if l]
    folder = Path(tempfile.mkdtemp(prefix="fuzz_seeds_"))
    try:
        seeds = write_seeds(folder)
        cases = [(l, args.seed + i) for l in loaders for i in range(args.cases)]
        start = time.perf_counter()
        results = run_cases(seeds, cases, args.timeout)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = summarize(results)
    print(f"# {sys.executable} {' '.join(sys.argv)}\n# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
          f"{os.uname().nodename}, {elapsed:.0f} s, load {os.getloadavg()[0]:.1f}")
    print_table(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": sys.argv, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "seconds": elapsed, "cases_per_loader": args.cases, "first_seed": args.seed,
                               "table": table}, indent=1))
    print(f"wrote {out}")
    bad = sum(r["crash"] + r["hang"] + r["partial"] for r in table.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
