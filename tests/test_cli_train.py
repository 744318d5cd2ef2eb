"""``sparsetorch train`` end to end on tiny settings, and its errors."""
import json
import sys
import textwrap

import pytest

from sparsetorch.cli.main import main


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        import torch

        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 2))

        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(512, 8, generator=g)
            y = (x[:, 0] + x[:, 1] > 0).long()
            return x[:384], y[:384], x[384:], y[384:]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_task"
    sys.modules.pop("my_task", None)


@pytest.mark.parametrize("method", ["rigl", "lottery", "compressed-rigl"])
def test_train_user_model_and_data(user_module, tmp_path, capsys, method):
    out = tmp_path / "r.json"
    rc = main(["train", "--method", method, "--sparsity", "0.8", "--model", f"{user_module}:model",
               "--data", f"{user_module}:data", "--epochs", "4", "--lr", "0.01", "--rounds", "1",
               "--json", str(out), "--set", "scope='global'" if method == "lottery" else "every=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "sparsity: 80.00% of the pruned layers" in printed
    result = json.loads(out.read_text())
    assert result["pruned_layers_sparsity"] == pytest.approx(0.8, abs=0.002)
    assert result["test_accuracy"] > 0.75  # a linearly separable task, learnt even at 80% sparsity


@pytest.mark.parametrize("argv,message", [
    (["--method", "magic"], "unknown --method"),
    (["--model", "no_colon"], "pkg.module:factory"),
    (["--model", "surely_missing_mod:f"], "cannot import"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--set", "every"], "KEY=VALUE"),
    (["--set", "every=0"], "positive integer"),
])
def test_train_errors(argv, message, capsys):
    assert main(["train", "--epochs", "1", *argv]) == 2
    assert message in capsys.readouterr().err
