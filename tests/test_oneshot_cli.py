"""``sparsetorch prune-lm``: a tiny byte-level GPT-2 folder pruned from a text file."""
import json

import pytest
import torch

from sparsetorch.cli.main import main
from sparsetorch.patterns import is_valid_mask

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    return tmp_path


def test_prune_lm_byte_model(model_dir, capsys):
    out = model_dir / "pruned"
    rc = main(["prune-lm", str(model_dir / "tiny"), "--method", "sparsegpt", "--pattern", "2:4", "--calibration",
               str(model_dir / "calib.txt"), "--out", str(out), "--nsamples", "8", "--seqlen", "32"])
    assert rc == 0
    assert "peak memory" in capsys.readouterr().out
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    w = model.transformer.h[1].mlp.c_fc.weight  # Conv1D: [in, out], groups run along the inputs
    assert is_valid_mask(w.t() != 0, "2:4") and (w == 0).float().mean().item() == pytest.approx(0.5)
    stats = json.loads((out / "oneshot.json").read_text())
    assert stats["mode"] == "sequential" and len(stats["layers"]) == 8
    assert (out / "sparsetorch.safetensors").is_file()


@pytest.mark.parametrize("extra", [["--seqlen", "1000"], ["--sparsity", "0.3", "--pattern", "2:4"], ["--calibration", "nope.txt"]])
def test_prune_lm_bad_input_exits_2(model_dir, extra, capsys):
    args = ["prune-lm", str(model_dir / "tiny"), "--calibration", str(model_dir / "calib.txt"),
            "--out", str(model_dir / "o"), "--nsamples", "2", "--seqlen", "16"]
    assert main(args + extra) == 2
    assert "error" in capsys.readouterr().err
    assert not (model_dir / "o").exists()
