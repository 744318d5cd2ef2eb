"""The command line and the report, as a user meets them."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.cli.main import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sparsetorch.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0 and "demo" in out.stdout


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--sparsities" in capsys.readouterr().out


def test_demo_runs_and_reports(tmp_path):
    out = _run("demo", "--epochs", "3", "--finetune-epochs", "1", "--sparsities", "0.5,0.9", "--json",
               str(tmp_path / "d.json"), "--report", str(tmp_path / "r.html"))
    assert out.returncode == 0, out.stderr
    assert "90%" in out.stdout and "file size" in out.stdout and "RigL" in out.stdout
    assert "Mask dynamics" in (tmp_path / "r.html").read_text()
    rows = json.loads((tmp_path / "d.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("one-shot magnitude", 0.5), ("one-shot magnitude", 0.9), ("GMP", 0.9), ("RigL", 0.9)]
    assert rows[2]["file_bytes"] < 0.3 * rows[0]["file_bytes"]
    assert rows[2]["params_kept"] < rows[1]["params_kept"] < rows[0]["params_kept"]
    assert rows[3]["params_kept"] == rows[4]["params_kept"] == rows[2]["params_kept"]  # same target, exactly


def test_error_is_one_line_and_nonzero():
    out = _run("demo", "--sparsities", "1.5")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "[0, 1)" in out.stderr


def test_import_is_light():
    code = "import sys, sparsetorch; print(sorted(m for m in ('transformers','sklearn','matplotlib','lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_report_rows_totals_and_flops():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.Linear(16, 3))
    sparsetorch.prune(model, 0.75, scope="layer")
    rep = sparsetorch.report(model, torch.zeros(1, 1, 8, 8))
    conv, fc, head = rep.rows
    assert conv.dense_flops == 2 * 36 * 64  # 36 weights applied at 64 output pixels
    assert conv.sparse_flops == 2 * 9 * 64
    assert fc.nonzeros == 4 * 64 * 16 // 4 and head.sparsity == 0.0
    assert rep.total.params == sum(r.params for r in rep.rows)
    assert fc.sparse_bytes < fc.dense_bytes
    dicts = json.loads(rep.to_json())
    assert dicts[-1]["name"] == "total" and "sparsity" in dicts[0]
    assert "total" in str(rep)


def test_report_without_inputs_has_no_flops():
    rep = sparsetorch.report(nn.Linear(4, 4))
    assert rep.rows[0].dense_flops is None and rep.total.dense_flops is None


def test_include_exclude_and_default_classifier():
    from sparsetorch.core.layer_selection import select_targets

    model = nn.Sequential()
    model.add_module("enc", nn.Linear(4, 4))
    model.add_module("dec", nn.Conv1d(4, 4, 1))
    model.add_module("lm_head", nn.Linear(4, 9))
    assert [t.fqn for t in select_targets(model)] == ["enc", "dec"]
    assert [t.fqn for t in select_targets(model, include=[nn.Linear])] == ["enc", "lm_head"]
    assert [t.fqn for t in select_targets(model, exclude=["d*"])] == ["enc"]
    assert [t.fqn for t in select_targets(model, include="lm_head")] == ["lm_head"]


def test_public_functions_survive_submodule_imports():
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(sparsetorch.__path__):
        if info.name in sparsetorch._LAZY:
            raise AssertionError(f"module sparsetorch.{info.name} shadows the public function of the same name")
    for name in ("prune", "report", "save", "load"):
        assert callable(getattr(sparsetorch, name))
