"""``sparsetorch prune-lm``: a tiny byte-level GPT-2 folder pruned from a text file."""
import json

import pytest
import torch

from sparsetorch.cli.main import main
from sparsetorch.core.patterns import is_valid_mask

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


def test_prune_lm_uses_the_folders_tokenizer(model_dir):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "def", "f(x):", "return", "x", "+", "1"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir / "tiny")
    from sparsetorch.cli.prune_lm import calibration_ids

    ids = calibration_ids(model_dir / "tiny", model_dir / "calib.txt", 4, 8, 0, 256)
    assert len(ids) == 4 and all(t.shape == (1, 8) for t in ids)
    assert max(int(t.max()) for t in ids) < len(words)  # word ids, not bytes
    out = model_dir / "pruned"
    assert main(["prune-lm", str(model_dir / "tiny"), "--method", "wanda", "--calibration", str(model_dir / "calib.txt"),
                 "--out", str(out), "--nsamples", "4", "--seqlen", "8"]) == 0
    assert (out / "tokenizer.json").is_file()


def test_prune_lm_owl_dsnot_int4(model_dir):
    import sparsetorch
    from sparsetorch.core.quant_grid import get_quant_grid

    out = model_dir / "owl"
    rc = main(["prune-lm", str(model_dir / "tiny"), "--method", "wanda", "--sparsity", "0.6", "--distribution", "owl",
               "--refine", "dsnot", "--bits", "4", "--group-size", "32", "--calibration", str(model_dir / "calib.txt"),
               "--out", str(out), "--nsamples", "4", "--seqlen", "32"])
    assert rc == 0
    stats = json.loads((out / "oneshot.json").read_text())
    assert stats["distribution"] == "owl" and stats["refine"] == "dsnot" and stats["bits"] == 4
    assert len({round(r["target"], 6) for r in stats["layers"]}) == 2  # one sparsity per block
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    sparsetorch.load(model, out / "sparsetorch.safetensors")
    assert get_quant_grid(model.transformer.h[0].mlp.c_fc).grid.bits == 4
