"""Kill-during-save trials (issue #20): a save killed with SIGKILL at a random moment must leave the previous
complete file (or, for the two-file training state, a pair that loads as one step or fails cleanly), never a
half-written file that loads, nor a model from one step with the optimizer state of another.

    python benchmarks/kill_during_save.py --trials 50 [--functions save,training_state,shrunk,edge] [--seed 0]

Per save function: one folder holds a complete save of version A; each trial forks a child (the library is
imported once, in the parent) that saves version B (then A, alternating) over it, and SIGKILLs it after a
random delay in [0, 1.3 x the measured save time]. The parent then loads what is there into a fresh target
and counts: intact (loads, equals the old or the new version), clean (SparsityError), mismatched_loadable
(loads but is neither version, or a training state whose weights are not those of its recorded step:
must be 0), other (any other exception), temps_after_kill (trials that left a temp file) and
temps_after_next_save (stale temps still there once the next, uninterrupted save ran: must be 0).
Writes benchmarks/results/kill_during_save.json. tests/test_hostile_files.py runs 5 trials per function.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ("save", "training_state", "shrunk", "edge")


# -- the two versions each function writes ------------------------------------------------------------------
def _mlp(seed: int):
    import torch
    import sparsetorch
    from sparsetorch.models import MLP
    torch.manual_seed(seed)
    model = MLP((64, 48, 32, 10))
    sparsetorch.prune(model, 0.5, pattern="channel", scope="layer")
    return model


class Case:
    """One save function: ``save(version, folder)`` writes version 0 or 1; ``identify(folder)`` loads what
    is there and returns the version it equals (None: loaded but equals neither)."""

    def __init__(self, name: str):
        import torch
        self.name, self.x = name, torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
        self.models = [self._build(v) for v in (0, 1)]
        self.reference = [self._fingerprint(m) for m in self.models]

    def _build(self, version: int):
        import torch
        model = _mlp(version)
        if self.name == "shrunk":
            from sparsetorch.shrink import shrink
            return shrink(model.eval(), self.x)
        if self.name == "training_state":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model(self.x).sum().backward()
            opt.step()
            return model, opt
        return model.eval()

    def _fingerprint(self, model):
        import torch
        m = model[0] if isinstance(model, tuple) else model
        with torch.no_grad():
            return m.eval()(self.x).clone()

    def save(self, version: int, folder: Path) -> None:
        import sparsetorch
        model = self.models[version]
        if self.name == "save":
            sparsetorch.save(model, folder / "m.safetensors")
        elif self.name == "training_state":
            from sparsetorch.integrations import save_training_state
            save_training_state(model[0], folder / "ckpt", model[1], extra={"step": version})
        elif self.name == "shrunk":
            from sparsetorch.shrink import save_shrunk
            save_shrunk(model, folder / "m.safetensors")
        else:
            sparsetorch.export_edge(model, self.x[:1], folder / "m.spt")

    def identify(self, folder: Path) -> int | None:
        import numpy as np
        import torch
        import sparsetorch
        if self.name == "save":
            model = sparsetorch.load(_mlp(2).eval(), folder / "m.safetensors")
            y, recorded = self._fingerprint(model), None
        elif self.name == "training_state":
            from sparsetorch.integrations import load_training_state
            model = _mlp(2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            recorded = load_training_state(model, folder / "ckpt", opt)["step"]
            y = self._fingerprint(model)
        elif self.name == "shrunk":
            from sparsetorch.shrink import load_shrunk
            y, recorded = self._fingerprint(load_shrunk(folder / "m.safetensors", lambda: _mlp(2))), None
        else:
            import sparsetorch.edge as edge
            y, recorded = torch.from_numpy(np.asarray(edge.load(folder / "m.spt")(self.x.numpy()))), None
        found = [v for v in (0, 1) if torch.allclose(y, self.reference[v], atol=1e-5)]
        if not found or (recorded is not None and recorded != found[0]):
            return None  # loadable but neither version, or weights of one step with the state of the other
        return found[0]


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))



def _child_save_time(case: Case, folder: Path) -> float:
    """Median time a forked child takes from its start signal to the end of its save (version 0 over itself)."""
    return sorted(_killed_save(case, 0, folder, None)[1] for _ in range(5))[2]


def _killed_save(case: Case, version: int, folder: Path, delay: float | None) -> tuple[int, float]:
    """Fork a child that saves ``version``; SIGKILL it after ``delay`` s (if still running; None: let it
    finish). Its exit status and how long its save ran (until done or killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: signal the start, save, leave without running the parent's cleanup
        os.close(read)
        os.write(write, b"1")
        try:
            case.save(version, folder)
            os.write(write, b"2")
        finally:
            os._exit(0)
    os.close(write)
    os.read(read, 1)  # the child is about to save
    start = time.perf_counter()
    if delay is None:
        os.read(read, 1)
    else:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ran = time.perf_counter() - start
    os.close(read)
    return os.waitpid(pid, 0)[1], ran  # reaped: its pid is dead, so the next save may remove its temp file


def run_function(name: str, trials: int, rng: random.Random, work: Path) -> dict:
    from sparsetorch.errors import SparsityError
    case, folder = Case(name), work / name
    folder.mkdir(parents=True, exist_ok=True)
    case.save(0, folder)
    duration = _child_save_time(case, folder)  # a forked child runs slower than the parent (copy-on-write)
    row = {"trials": trials, "save_s": round(duration, 4), "intact": 0, "intact_new": 0, "clean": 0,
           "mismatched_loadable": 0, "other": 0, "temps_after_kill": 0, "temps_after_next_save": 0,
           "killed_before_done": 0, "bad": []}
    current = 0
    for trial in range(trials):
        new = 1 - current
        status, _ = _killed_save(case, new, folder, rng.uniform(0, 1.3 * duration))
        row["killed_before_done"] += int(os.WIFSIGNALED(status))
        row["temps_after_kill"] += int(bool(_temps(folder)))
        try:
            found = case.identify(folder)
        except SparsityError:
            row["clean"] += 1
            found = "clean"
        except Exception as exc:  # noqa: BLE001 - the point is to see which
            row["other"] += 1
            row["bad"].append(f"trial {trial}: {type(exc).__name__}: {str(exc)[:150]}")
            found = "other"
        if found is None:
            row["mismatched_loadable"] += 1
            row["bad"].append(f"trial {trial}: loads but is neither version (or mixes two steps)")
        elif found in (0, 1):
            row["intact"] += 1
            row["intact_new"] += int(found == new)
        current = new
        case.save(current, folder)  # the next, uninterrupted save: must clean up the killed one's temp file
        row["temps_after_next_save"] += int(bool(_temps(folder)))
    return row


def run(trials: int, functions=FUNCTIONS, seed: int = 0) -> dict[str, dict]:
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool across fork()
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kill_during_save_"))
    try:
        return {name: run_function(name, trials, rng, work) for name in functions}
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per save function")
    ap.add_argument("--functions", default=",".join(FUNCTIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_during_save.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT / "src"))
    start = time.perf_counter()
    table = run(args.trials, [f for f in args.functions.split(",") if f], args.seed)
    cols = ("trials", "save_s", "killed_before_done", "intact", "intact_new", "clean", "mismatched_loadable",
            "other", "temps_after_kill", "temps_after_next_save")
    print(f"{'function':<16}" + "".join(f"{c:>22}" for c in cols))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>22}" for c in cols))
        for line in row["bad"][:5]:
            print("   ", line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": sys.argv, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "seconds": time.perf_counter() - start, "table": table}, indent=1))
    print(f"wrote {out}")
    bad = sum(r["mismatched_loadable"] + r["other"] + r["temps_after_next_save"] for r in table.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
