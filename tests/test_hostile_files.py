"""Hostile files never reach the kernels (issue #20): index validators, the crashing cases kept as
regressions (a valid file + one specific edit), atomic_write's temp files, and a short seeded fuzz run
(each case in a subprocess, so a segfault is reported with its seed instead of killing pytest)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.errors import SparsityError
from sparsetorch.formats import index_checks as ic

ROOT = Path(__file__).resolve().parent.parent
SRC = str(Path(sparsetorch.__file__).resolve().parent.parent)  # the copy under test (benchmarks/asan_kernels.sh: its own)


# -- validators ------------------------------------------------------------------------------------------------
def test_check_csr_accepts_valid_and_rejects_each_defect():
    indptr, indices = np.array([0, 2, 2, 3], np.int32), np.array([0, 5, 7], np.uint16)
    ic.check_csr("w", indptr, indices, 3, 8)
    bad = [
        (np.array([0, -2, 2, 3], np.int32), indices, "decrease"),
        (np.array([1, 2, 2, 3], np.int32), indices, "start at"),
        (np.array([0, 2, 2, 4], np.int32), indices, "end at"),
        (np.array([0, 2, 3], np.int32), indices, "row pointers for"),
        (np.array([0, 2, 2, 3], np.float32), indices, "dtype"),
        (indptr, np.array([0, 5, 8], np.uint16), "outside [0, 8)"),
        (indptr, np.array([0, 65535, 7], np.uint16), "outside"),
        (indptr, np.array([0, -1, 7], np.int32), "outside"),
    ]
    for p, i, words in bad:
        with pytest.raises(SparsityError, match=r"(?s)" + __import__("re").escape(words) + ".*re-export"):
            ic.check_csr("w", p, i, 3, 8)


def test_check_shape_bitmask_nm_blocks_bytes():
    assert ic.check_shape("w", [3, 4], ndim=2) == (3, 4)
    for shape in ([-1, 4], [3], [2**40, 2**40], ["3", 4], [True, 2], None):
        with pytest.raises(SparsityError):
            ic.check_shape("w", shape, ndim=2)
    bits = np.packbits(np.array([1, 0, 1, 1, 0], bool))
    ic.check_bitmask("m", bits, 5, 3)
    with pytest.raises(SparsityError, match="sets 3 bits but stores 2"):
        ic.check_bitmask("m", bits, 5, 2)
    with pytest.raises(SparsityError, match="bytes for"):
        ic.check_bitmask("m", bits, 10**9, 3)
    with pytest.raises(SparsityError, match="past its"):
        ic.check_bitmask("m", np.array([0xFF], np.uint8), 5, 5)
    ic.check_nm_codes("nm", np.array([0, 2, 3, 1], np.uint8), 2, 4)
    with pytest.raises(SparsityError):
        ic.check_nm_codes("nm", np.array([0, 4], np.uint8), 2, 4)
    with pytest.raises(SparsityError, match="twice"):
        ic.check_nm_codes("nm", np.array([1, 1], np.uint8), 2, 4)
    with pytest.raises(SparsityError):
        ic.check_nm_codes("nm", np.array([0], np.uint8), 0, 4)
    ic.check_block_indices("b", np.array([0, 3], np.int64), 4)
    with pytest.raises(SparsityError):
        ic.check_block_indices("b", np.array([4], np.int64), 4)
    ic.check_claimed_bytes("x", 10, 10)
    with pytest.raises(SparsityError, match="only justifies"):
        ic.check_claimed_bytes("x", 11, 10)


def test_index_checks_import_without_torch():
    code = ("import sys; import sparsetorch.edge, sparsetorch.edge.weights as w; w.checks.check_shape('w', [1, 2]);"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})


# -- edge files: the crashing cases, as regressions -------------------------------------------------------------
def _mlp(sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            w = lin.weight
            w[torch.rand_like(w) < sparsity] = 0
    return model


def edge_seed(path: Path, sparsity=0.99) -> Path:
    """A valid edge file from the library's own exporter (CSR at 99% sparsity, bitmask at 50-90%)."""
    sparsetorch.export_edge(_mlp(sparsity), torch.randn(1, 64), path)
    return path


def read_edge(path):
    with safe_open(str(path), framework="numpy") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def write_edge(path, metadata, arrays):
    save_file(arrays, str(path), metadata=metadata)
    return path


def _edit(path, out, fn):
    meta, arrays = read_edge(path)
    desc = json.loads(meta["sparsetorch.edge"])
    fn(desc, arrays)
    meta["sparsetorch.edge"] = json.dumps(desc)
    return write_edge(out, meta, arrays)


def _run_forward(path, backend="auto"):
    model = edge.load(path, backend=backend)
    return model(np.ones((2, 64), np.float32))


def _negative_indptr(desc, arrays):
    key = "0.weight/indptr"
    arrays[key] = arrays[key].copy()
    arrays[key][1:-1] = -1000


def _indices_65535(desc, arrays):
    arrays["0.weight/indices"] = np.full_like(arrays["0.weight/indices"], 65535)


def _indptr_beyond_nnz(desc, arrays):
    arrays["0.weight/indptr"] = (arrays["0.weight/indptr"] * 50).astype(np.int32)


def _wide_shape_claim(desc, arrays):  # 16-bit indices but a claimed width far past them
    desc["tensors"]["0.weight"]["shape"] = [32, 10**6]


def _float_indices(desc, arrays):
    arrays["0.weight/indices"] = arrays["0.weight/indices"].astype(np.float32)


EDGE_CSR_CASES = {"negative_indptr": _negative_indptr, "indices_65535": _indices_65535,
                  "indptr_beyond_nnz": _indptr_beyond_nnz, "wide_shape_claim": _wide_shape_claim,
                  "float_indices": _float_indices}


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC})


@pytest.mark.parametrize("case", sorted(EDGE_CSR_CASES))
@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_edge_hostile_csr_is_clean_error(tmp_path, case, backend):
    seed = edge_seed(tmp_path / "ok.spt")
    assert read_edge(seed)[1]["0.weight/indptr"].dtype == np.int32  # the seed is CSR: the edit hits it
    bad = _edit(seed, tmp_path / "bad.spt", EDGE_CSR_CASES[case])
    # in a subprocess: before the fix these segfaulted (negative_indptr) or read out of bounds
    code = (f"import numpy as np, sparsetorch.edge as e\nfrom sparsetorch.errors import SparsityError\n"
            f"try:\n m = e.load({str(bad)!r}, backend={backend!r}); m(np.ones((2, 64), np.float32))\n"
            f"except SparsityError as exc: print('CLEAN', exc)\nelse: print('LOADED')\n")
    res = _run_isolated(code)
    assert res.returncode == 0, f"crashed with {res.returncode}: {res.stderr[-2000:]}"
    assert "CLEAN" in res.stdout, res.stdout + res.stderr


def test_edge_huge_bitmask_claim_is_refused_before_allocating(tmp_path):
    seed = edge_seed(tmp_path / "ok.spt", sparsity=0.5)
    meta, arrays = read_edge(seed)
    desc = json.loads(meta["sparsetorch.edge"])
    layouts = {k: v["layout"] for k, v in desc["tensors"].items()}
    assert "bitmask" in layouts.values(), layouts
    name = next(k for k, v in layouts.items() if v == "bitmask")

    def claim(desc, arrays):
        desc["tensors"][name]["shape"] = [2**20, 2**20]  # a 1 TiB mask from a few-KB file
    bad = _edit(seed, tmp_path / "bad.spt", claim)
    assert os.path.getsize(bad) < 100_000
    with pytest.raises(SparsityError, match="bytes for"):
        edge.load(bad)


def test_edge_valid_files_still_match(tmp_path):
    for sparsity in (0.9, 0.5, 0.0):
        model = _mlp(sparsity)
        path = edge_seed(tmp_path / f"ok{sparsity}.spt", sparsity)
        x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        for backend in ("auto", "numpy", "dense"):
            y = edge.load(path, backend=backend)(x)
            np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


# -- atomic_write: no temp files left behind -------------------------------------------------------------------
def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_removes_temp_on_every_exit(tmp_path, monkeypatch, exc):
    from sparsetorch.formats import atomic

    def boom(fd):
        raise exc
    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(type(exc)):
        atomic.atomic_write(tmp_path / "m.safetensors", b"x" * 100)
    assert _temps(tmp_path) == []
    assert not (tmp_path / "m.safetensors").exists()


def test_atomic_write_sigterm_mid_write_removes_temp(tmp_path):
    code = (f"import os, signal\nfrom pathlib import Path\nfrom sparsetorch.formats import atomic\n"
            f"real = os.fsync\n"
            f"def slow(fd):\n os.kill(os.getpid(), signal.SIGTERM)\n real(fd)\n"
            f"atomic.os.fsync = slow\n"
            f"atomic.atomic_write(Path({str(tmp_path / 'm.bin')!r}), b'x' * 10)\n")
    res = _run_isolated(code)
    assert res.returncode != 0 and "signal" in res.stderr
    assert _temps(tmp_path) == []


def test_stale_temp_of_killed_run_is_removed_on_next_save(tmp_path):
    from sparsetorch.formats import atomic
    # a save killed with SIGKILL between write and rename leaves its temp file
    code = (f"import os, signal\nfrom pathlib import Path\nfrom sparsetorch.formats import atomic\n"
            f"atomic.os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"atomic.atomic_write(Path({str(tmp_path / 'm.bin')!r}), b'x' * 10)\n")
    res = _run_isolated(code)
    assert res.returncode == -9
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.bin.")
    live = tmp_path / f".m.bin.{os.getpid()}.abcd1234.tmp"  # a concurrent writer in a live process: kept
    live.write_bytes(b"y")
    other = tmp_path / ".other.bin.1.abcd1234.tmp"  # another destination's temp: not ours to judge
    other.write_bytes(b"z")
    atomic.atomic_write(tmp_path / "m.bin", b"new")
    assert (tmp_path / "m.bin").read_bytes() == b"new"
    assert _temps(tmp_path) == sorted([live.name, other.name])
    old = tmp_path / ".m.bin.abcd1234.tmp"  # the older naming without pid: removed once a day old
    old.write_bytes(b"o")
    os.utime(old, (0, 0))
    atomic.atomic_write(tmp_path / "m.bin", b"newer")
    assert _temps(tmp_path) == sorted([live.name, other.name])


# -- torch loaders: validators written, wiring is wave 2 ----------------------------------------------------------
_TORCH_CASE = """
import torch, sparsetorch
from torch import nn
from sparsetorch.errors import SparsityError
torch.manual_seed(0)
def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    if KIND == "inference":
        return sparsetorch.to_inference(m.eval(), torch.randn(4, 64), budget_s=0.005, fuse="always")
    return sparsetorch.to_sparse_training(m, 0.9)
model = build()
state = model.state_dict()
key = next(k for k in state if k.endswith("indices"))
state[key].fill_(VALUE)  # 30000 in a 64-wide layer, in place: a hostile writer skips load_state_dict's checks
path = sparsetorch.save(model, PATH)
fresh = build()
try:
    sparsetorch.load(path, fresh)
    y = fresh(torch.randn(4, 64))
    if KIND == "training":
        y.sum().backward()
except SparsityError as exc:
    print("CLEAN", exc)
else:
    print("LOADED")
"""


@pytest.mark.parametrize("kind,value", [("inference", 30000), ("inference", -5), ("training", 30000)])
def test_torch_load_hostile_indices_is_clean_error(tmp_path, kind, value):
    """Before the load-time checks: sparsetorch.load copied 30000 into a 64-wide layer's column indices and the
    next forward segfaulted (inference: FusedChain/CSRWeight; training: SparseLinear's kernels)."""
    code = f"KIND, VALUE, PATH = {kind!r}, {value}, {str(tmp_path / 'm.safetensors')!r}\n" + _TORCH_CASE
    res = _run_isolated(code)
    assert res.returncode == 0, f"crashed with {res.returncode}: {res.stderr[-1500:]}"
    assert "CLEAN" in res.stdout, res.stdout + res.stderr[-1500:]


def test_torch_layer_validators_reject_the_hostile_buffers():
    """The validators the layers' _load_from_state_dict call (index_checks.check_csr_weight) catch these buffers."""
    from sparsetorch.kernels.packed import CSRWeight
    w = torch.randn(64, 64)
    w[torch.rand_like(w) < 0.9] = 0
    c = CSRWeight.from_dense(w)
    args = (c.indptr.numpy(), c.indices.numpy(), c.values.numpy(), 64, 64)
    ic.check_csr_weight("fc", *args)
    with pytest.raises(SparsityError, match="outside"):
        ic.check_csr_weight("fc", args[0], torch.full_like(c.indices, 30000).numpy(), *args[2:])
    with pytest.raises(SparsityError, match="decrease"):
        ic.check_csr_weight("fc", (c.indptr * torch.tensor([1, -1]).repeat(33)[:65]).numpy(), *args[1:])
    sl = sparsetorch.to_sparse_training(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)), 0.9)[0]
    ic.check_csr_weight("sl", sl.indptr.numpy(), sl.indices.numpy(), sl.values.detach().numpy(), 64, 64)


# -- short seeded fuzz run (benchmarks/fuzz_loaders.py has the long one) ---------------------------------------
FUZZ_CASES = 30  # per loader; about 10 s for all six on one core


@pytest.fixture(scope="module")
def fuzz_table(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location("fuzz_loaders", ROOT / "benchmarks" / "fuzz_loaders.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    seeds = fuzz.write_seeds(tmp_path_factory.mktemp("fuzz_seeds"))
    results = fuzz.run_cases(seeds, [(l, i) for l in fuzz.LOADERS for i in range(FUZZ_CASES)], timeout=60)
    return fuzz.summarize(results)


def _fuzz_report(row):
    return "; ".join(f"seed {b['seed']} {b['outcome']} ({b['detail']})" for b in row["bad_seeds"])


@pytest.mark.parametrize("loader", ["save_masked", "edge", "shrunk", "training_state", "cli_info"])
def test_fuzz_no_crash_hang_or_partial_load(fuzz_table, loader):
    row = fuzz_table[loader]
    assert row["cases"] == FUZZ_CASES
    assert row["crash"] == row["hang"] == row["partial"] == 0, _fuzz_report(row)


def test_fuzz_edge_fails_only_with_sparsity_error(fuzz_table):
    row = fuzz_table["edge"]
    assert row["other"] == 0 and row["clean"] > FUZZ_CASES // 2, _fuzz_report(row)


def test_fuzz_inference_file_no_crash(fuzz_table):
    row = fuzz_table["save_inference"]
    assert row["crash"] == row["hang"] == row["partial"] == 0, _fuzz_report(row)


# -- shrunk files: a declared schema, not arbitrary attributes ----------------------------------------------------
def _shrunk_seed(tmp_path):
    from sparsetorch.models import MLP
    from sparsetorch.shrink import save_shrunk, shrink

    def base():
        torch.manual_seed(0)
        model = MLP((64, 48, 32, 10))
        sparsetorch.prune(model, 0.5, pattern="channel", scope="layer")
        return model
    path = save_shrunk(shrink(base().eval(), torch.randn(4, 64)), tmp_path / "ok.safetensors")
    return path, base


def _edit_shrunk(path, out, fn):
    with safe_open(str(path), framework="numpy") as fh:
        meta, arrays = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta["sparsetorch_shrunk"])
    fn(header)
    meta["sparsetorch_shrunk"] = json.dumps(header)
    save_file(arrays, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("edit,words", [
    (lambda h: h["attrs"].update({"": {"forward": None}}), "'forward'"),
    (lambda h: h["attrs"][next(iter(h["attrs"]))].update({"training": False}), "'training'"),
    (lambda h: h["attrs"][next(iter(h["attrs"]))].update({"in_features": True}), "positive integer"),
    (lambda h: h["attrs"][next(iter(h["attrs"]))].update({"in_features": 7}), "tensors imply"),
    (lambda h: h["attrs"][next(iter(h["attrs"]))].update({"out_features": -1}), "positive integer"),
    (lambda h: h["attrs"].update({next(iter(h["attrs"])): [1]}), "mapping"),
    (lambda h: h["config"].update({"forward": 3}), "'forward'"),
    (lambda h: h.update({"version": "1"}), "version"),
    (lambda h: h.update({"version": [2]}), "version"),
])
def test_load_shrunk_sets_only_declared_size_attributes(tmp_path, edit, words):
    from sparsetorch.shrink import load_shrunk
    path, base = _shrunk_seed(tmp_path)
    load_shrunk(path, base)(torch.randn(2, 64))  # the seed loads
    bad = _edit_shrunk(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(SparsityError, match=__import__("re").escape(words)):
        load_shrunk(bad, base)


# -- training state: all or nothing, never two steps mixed ------------------------------------------------------
def _run_state(steps, seed=0):
    """A pruned MLP trained ``steps`` SGD steps under a magnitude sparsifier (its masks in the state)."""
    import ddp_worker
    from sparsetorch.models import MLP
    torch.manual_seed(seed)
    model = MLP((12, 24, 16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = ddp_worker.methods()["swap"](torch.Generator().manual_seed(7))
    sparsifier.attach(model, opt)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        torch.nn.functional.cross_entropy(model(torch.randn(8, 12, generator=g)),
                                          torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        sparsifier.step()
    return model, opt, sparsifier


def _fresh_state():
    import ddp_worker
    from sparsetorch.models import MLP
    torch.manual_seed(1)
    model = MLP((12, 24, 16, 3))
    return model, ddp_worker.methods()["swap"](torch.Generator().manual_seed(7))


def _model_unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before) \
        and not list(sparsetorch.iter_masks(model))


def test_load_training_state_with_other_optimizer_changes_nothing(tmp_path):
    from sparsetorch.integrations import load_training_state, save_training_state
    model, opt, sp = _run_state(3)
    save_training_state(model, tmp_path / "ckpt", opt, sp, extra={"step": 3})
    fresh, sparsifier = _fresh_state()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    two_groups = torch.optim.SGD([{"params": [fresh.fc1.weight]},
                                  {"params": [p for n, p in fresh.named_parameters() if n != "fc1.weight"]}],
                                 lr=0.05, momentum=0.9)
    with pytest.raises(SparsityError, match="parameter groups"):
        load_training_state(fresh, tmp_path / "ckpt", two_groups, sparsifier)
    assert _model_unchanged(fresh, before) and sparsifier.model is None and not two_groups.state


def test_load_training_state_failing_late_undoes_model_optimizer_and_attach(tmp_path, monkeypatch):
    from sparsetorch.integrations import load_training_state, save_training_state
    model, opt, sp = _run_state(3)
    save_training_state(model, tmp_path / "ckpt", opt, sp, extra={"step": 3})
    fresh, sparsifier = _fresh_state()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)

    def broken(state):
        raise RuntimeError("boom after the weights and the optimizer were loaded")
    monkeypatch.setattr(sparsifier, "load_state_dict", broken)
    with pytest.raises(SparsityError, match="nothing was changed"):
        load_training_state(fresh, tmp_path / "ckpt", optimizer, sparsifier)
    assert _model_unchanged(fresh, before) and sparsifier.model is None and not optimizer.state
    monkeypatch.undo()
    load_training_state(fresh, tmp_path / "ckpt", optimizer, sparsifier)  # the same objects still load it
    assert torch.equal(fresh.fc1.weight, model.fc1.weight) and sparsifier.step_count == 3


@pytest.mark.parametrize("victim", ["model.safetensors", "state.safetensors"])
def test_training_state_from_two_steps_never_loads(tmp_path, victim):
    from sparsetorch.integrations import load_training_state, save_training_state
    for steps in (2, 4):
        model, opt, sp = _run_state(steps)
        save_training_state(model, tmp_path / f"step{steps}", opt, sp, extra={"step": steps})
    shutil.copy(tmp_path / "step2" / victim, tmp_path / "step4" / victim)
    fresh, sparsifier = _fresh_state()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(SparsityError, match="does not belong"):
        load_training_state(fresh, tmp_path / "step4", optimizer, sparsifier)
    assert _model_unchanged(fresh, before) and sparsifier.model is None


def test_kill_during_save_short_run():
    """5 SIGKILLed saves per save function (benchmarks/kill_during_save.py runs 50+)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("kill_during_save", ROOT / "benchmarks" / "kill_during_save.py")
    kds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kds)
    table = kds.run(5, seed=1)
    for name, row in table.items():
        assert row["mismatched_loadable"] == row["other"] == row["temps_after_next_save"] == 0, (name, row)
        assert row["intact"] + row["clean"] == 5, (name, row)


# -- sparsetorch files: metadata of the wrong type is a SparsityError (was TypeError: unhashable) ---------------
@pytest.mark.parametrize("field,value", [("format", {}), ("format", ["csr"]), ("dtype", [1, 2]), ("dtype", {}),
                                         ("values", ["fp16"]), ("shape", ["bitmask"])])
def test_unhashable_metadata_is_clean_error_for_load_and_info(tmp_path, capsys, field, value):
    from sparsetorch.cli.main import main
    from sparsetorch.models import MLP
    torch.manual_seed(0)
    model = MLP((64, 48, 10))
    sparsetorch.prune(model, 0.8)
    path = sparsetorch.save(model, tmp_path / "ok.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        meta, arrays = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta["sparsetorch"])
    for entry in header["tensors"].values():
        entry[field] = value
    meta["sparsetorch"] = json.dumps(header)
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = MLP((64, 48, 10))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(SparsityError):
        sparsetorch.load(fresh, tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert main(["info", str(tmp_path / "bad.safetensors")]) != 0  # a TypeError would propagate from main
    assert "error:" in capsys.readouterr().err


def test_load_refusing_a_later_layer_leaves_earlier_layers_unchanged(tmp_path):
    """sparsetorch.load into an inference model whose second packed layer has hostile indices: the first
    layer's (valid) tensors must not stay loaded."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    fast = sparsetorch.to_inference(m.eval(), torch.randn(4, 64), budget_s=0.005, fuse="always")
    state = fast.state_dict()
    keys = [k for k in state if k.endswith("indices")]
    assert len(keys) >= 2, keys
    for k, v in state.items():
        if v.is_floating_point():
            v.mul_(2)  # every value changes: a partial load would show
    state[keys[-1]].fill_(30000)
    path = sparsetorch.save(fast, tmp_path / "bad.safetensors")
    fresh = sparsetorch.to_inference(m.eval(), torch.randn(4, 64), budget_s=0.005, fuse="always")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    x = torch.randn(3, 64)
    y = fresh(x)
    with pytest.raises(SparsityError, match="outside"):
        sparsetorch.load(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    torch.testing.assert_close(fresh(x), y)


# -- int4 / grid codecs: every new field is checked before a weight is set ------------------------------------------
def _int4_file(tmp_path):
    """A valid values='grid' file of a 4-bit grid (group 16), forced to bitmask so its parts are plain (no squeeze):
    ``(path, header, parts, build)``; an odd number of kept codes, so the last byte has a padding nibble."""
    from sparsetorch.core.quant_grid import set_quant_grid
    from sparsetorch.oneshot.quantize import QuantGrid, round_to_nearest

    def build(quantized=True):
        torch.manual_seed(0)
        layer = nn.Linear(32, 8, bias=False)
        if quantized:
            keep = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) < 0.5
            if int(keep.sum()) % 2 == 0:
                keep[0, 0] = not keep[0, 0]  # an odd count of codes
            w, scales = round_to_nearest(layer.weight.detach(), keep, QuantGrid(4, 16))
            with torch.no_grad():
                layer.weight.copy_(w)
            sparsetorch.set_mask(layer, keep)
            set_quant_grid(layer, scales, QuantGrid(4, 16))
        return layer
    layer = build()
    path = sparsetorch.save(layer, tmp_path / "ok.safetensors", format="bitmask", values="grid")
    with safe_open(str(path), framework="pt") as fh:
        meta, parts = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta["sparsetorch"])
    entry = header["tensors"]["weight"]
    assert entry["values"] == "int4" and entry["nibbles"] % 2 == 1 and "z" not in entry, entry
    return path, header, parts, build


def _write_sparsetorch(path, header, parts):
    from safetensors.torch import save_file as save_torch
    save_torch({k: v.contiguous() for k, v in parts.items()}, str(path), metadata={"sparsetorch": json.dumps(header)})
    return path


def _set_code(parts, index, nibble):
    """Put a raw 4-bit pattern at code ``index`` of the packed values."""
    v = parts["weight::values"].clone()
    byte, high = divmod(index, 2)
    b = int(v[byte])
    v[byte] = (b & 0x0F) | (nibble << 4) if high else (b & 0xF0) | nibble
    parts["weight::values"] = v


def _scales(fn):
    def edit(header, parts):
        parts["weight::scales"] = fn(parts["weight::scales"].clone())
    return edit


def _meta(key, value):
    def edit(header, parts):
        header["tensors"]["weight"][key] = value
    return edit


def _drop_byte(header, parts):
    parts["weight::values"] = parts["weight::values"][:-1].clone()


def _int8_values(header, parts):
    parts["weight::values"] = parts["weight::values"].view(torch.int8).clone()


def _padding_nibble(header, parts):
    _set_code(parts, header["tensors"]["weight"]["nibbles"], 3)


def _minus_eight(header, parts):
    _set_code(parts, 0, 8)


def _drop_scales(header, parts):
    del parts["weight::scales"]


def _neg(s):
    s[0] = -1.0
    return s


def _nan(s):
    s[1] = float("nan")
    return s


def _inf(s):
    s[2] = float("inf")
    return s


INT4_CASES = {
    "values_short": (_drop_byte, "bytes for"),
    "values_int8": (_int8_values, "expected uint8"),
    "padding_nibble": (_padding_nibble, "past their"),
    "code_minus_8": (_minus_eight, "-8"),
    "nibbles_negative": (_meta("nibbles", -1), "nibbles"),
    "nibbles_bool": (_meta("nibbles", True), "nibbles"),
    "nibbles_text": (_meta("nibbles", "3"), "nibbles"),
    "nibbles_huge": (_meta("nibbles", 2**40), "nibbles"),
    "nibbles_off_by_two": (lambda h, p: h["tensors"]["weight"].update(nibbles=h["tensors"]["weight"]["nibbles"] - 2),
                           "bytes for"),
    "scales_negative": (_scales(_neg), "negative or not finite"),
    "scales_nan": (_scales(_nan), "negative or not finite"),
    "scales_inf": (_scales(_inf), "negative or not finite"),
    "scales_fp16": (_scales(lambda s: s.half()), "float32"),
    "scales_short": (_scales(lambda s: s[:-1]), "float32"),
    "scales_missing": (_drop_scales, "lacks the scales"),
    "group_zero": (_meta("group_size", 0), "group_size"),
    "group_too_wide": (_meta("group_size", 33), "group_size"),
    "group_bool": (_meta("group_size", True), "group_size"),
    "group_changes_count": (_meta("group_size", 8), "float32"),
    "grid_bits_3": (_meta("grid_bits", 3), "grid_bits"),
    "grid_bits_8_in_int4": (_meta("grid_bits", 8), "grid_bits"),
    "grid_flag_text": (_meta("grid", "yes"), "'grid'"),
    "transposed_text": (_meta("transposed", 1), "'transposed'"),
    "values_int3": (_meta("values", "int3"), "value codec"),
}


@pytest.mark.parametrize("case", sorted(INT4_CASES))
def test_hostile_int4_grid_file_is_clean_error_before_any_weight_is_set(tmp_path, case):
    from sparsetorch.core.quant_grid import get_quant_grid
    path, header, parts, build = _int4_file(tmp_path)
    fresh = build(quantized=False)
    sparsetorch.load(fresh, path)  # the seed loads, bit for bit, with its grid
    assert torch.equal(fresh.weight, build().weight) and get_quant_grid(fresh) is not None
    edit, words = INT4_CASES[case]
    edit(header, parts)
    bad = _write_sparsetorch(tmp_path / "bad.safetensors", header, parts)
    fresh = build(quantized=False)
    before = fresh.weight.detach().clone()
    with pytest.raises(SparsityError, match=__import__("re").escape(words)):
        sparsetorch.load(fresh, bad)
    assert torch.equal(fresh.weight, before) and sparsetorch.get_mask(fresh) is None and get_quant_grid(fresh) is None


def test_hostile_int8_code_minus_128_is_refused(tmp_path):
    from sparsetorch.models import MLP
    torch.manual_seed(0)
    model = MLP((16, 8, 4))
    path = sparsetorch.save(model, tmp_path / "ok.safetensors", values="int8")
    with safe_open(str(path), framework="pt") as fh:
        meta, parts = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta["sparsetorch"])
    key = next(k for k, e in header["tensors"].items() if e.get("values") == "int8" and "z" not in e)
    name = f"{key}::values"
    parts[name] = parts[name].clone()
    parts[name].view(-1)[0] = -128
    bad = _write_sparsetorch(tmp_path / "bad.safetensors", header, parts)
    with pytest.raises(SparsityError, match=r"outside \[-127, 127\]"):
        sparsetorch.load(MLP((16, 8, 4)), bad)
