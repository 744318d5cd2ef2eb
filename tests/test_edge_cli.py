"""`sparsetorch export CHECKPOINT --edge OUT.spt [--int8]` and the GPT path of the edge runtime."""
import numpy as np
import pytest
import torch

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.cli.main import main
from sparsetorch.export.edge import export_edge
from sparsetorch.errors import SparsityError
from sparsetorch.models import MLP, SmallCNN

MLP_ARCH = {"factory": "sparsetorch.models:MLP", "kwargs": {"sizes": [64, 32, 10]}}


def _checkpoint(tmp_path, model, **meta):
    torch.manual_seed(0)
    sparsetorch.prune(model, 0.9)
    return sparsetorch.save(model, tmp_path / "model.safetensors", metadata=meta)


@pytest.mark.parametrize("flags, values", [([], "fp32"), (["--int8"], "int8"), (["--values", "bf16"], "bf16")])
def test_cli_exports_a_builtin_checkpoint(tmp_path, capsys, flags, values):
    torch.manual_seed(0)
    model = MLP([64, 32, 10]).eval()
    ckpt = _checkpoint(tmp_path, model, architecture=MLP_ARCH, input_shape=[64])
    out = tmp_path / "m.spt"
    assert main(["export", str(ckpt), "--edge", str(out)] + flags) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    got = edge.load(out)(x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max() if values != "fp32" else 1e-5)
    assert edge.load(out).description["values"] == values
    assert main(["export", str(ckpt), "--edge", str(out), "--int8", "--values", "bf16"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_cli_model_factory_and_input_shape(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = _checkpoint(tmp_path, SmallCNN())
    out = tmp_path / "cnn.spt"
    assert main(["export", str(ckpt), "--edge", str(out)]) == 2
    assert "built-in architecture" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--edge", str(out), "--model", "sparsetorch.models:SmallCNN"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--edge", str(out), "--model", "sparsetorch.models:SmallCNN",
                 "--input-shape", "1,8,8"]) == 0
    assert edge.load(out)(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)


def test_cli_reports_unsupported_layers(tmp_path, capsys, monkeypatch):
    (tmp_path / "edge_lstm_factory.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn = torch.nn.LSTM(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.rnn(x)[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from edge_lstm_factory import Net

    ckpt = sparsetorch.save(Net(), tmp_path / "lstm.safetensors")
    out = tmp_path / "x.spt"
    assert main(["export", str(ckpt), "--edge", str(out), "--model", "edge_lstm_factory:Net", "--input-shape", "3,4"]) == 2
    err = capsys.readouterr().err
    assert "sparsetorch export: error" in err and "'rnn' (LSTM)" in err and "not supported" in err
    assert not out.exists()


# -- GPT with KV cache ----------------------------------------------------------------------------------------
gpt = pytest.importorskip("sparsetorch.models.gpt")


@pytest.fixture(scope="module")
def small_gpt():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(layers=2, width=64, heads=4, context=16)).eval()
    sparsetorch.prune(model, 0.7)
    return model


def test_gpt_logits_and_greedy_generation_match_torch(small_gpt, tmp_path):
    from sparsetorch.export.edge_gpt import torch_generate

    path = tmp_path / "gpt.spt"
    export_edge(small_gpt, torch.zeros(1, 4, dtype=torch.long), path)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = small_gpt(ids).numpy()
    reference = torch_generate(small_gpt, b"hello", 20)
    for backend in ("numpy", "dense", "auto"):
        model = edge.load(path, backend=backend)
        np.testing.assert_allclose(model(ids.numpy()), want, atol=1e-5)
        # 20 new tokens from a 5-byte prompt: 11 use the KV cache, the rest slide past the 16-token context
        assert model.generate(b"hello", 20) == reference


def test_gpt_sampling_is_seeded_and_inputs_are_checked(small_gpt, tmp_path):
    path = tmp_path / "gpt.spt"
    export_edge(small_gpt, torch.zeros(1, 4, dtype=torch.long), path, values="int8")
    model = edge.load(path)
    a = model.generate([1, 2, 3], 6, temperature=0.8, top_k=20, seed=7)
    assert a == model.generate([1, 2, 3], 6, temperature=0.8, top_k=20, seed=7) and len(a) == 9
    with pytest.raises(SparsityError, match="context"):
        model(np.zeros((1, 17), np.int64))
    with pytest.raises(SparsityError, match="token ids"):
        model(np.full((1, 4), 256))
    with pytest.raises(SparsityError, match="integer token ids"):
        model(np.zeros((1, 4), np.float32))


def test_cli_exports_the_gpt_and_the_runtime_generates_without_torch(tmp_path, capsys):
    import subprocess
    import sys

    from sparsetorch.export.edge_gpt import torch_generate

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(layers=1, width=32, heads=2, context=32)).eval()
    sparsetorch.prune(model, 0.8)
    ckpt = sparsetorch.save(model, tmp_path / "gpt.safetensors")
    out = tmp_path / "gpt.spt"
    # the default GPTConfig differs: the checkpoint does not fit it, and the CLI says so
    assert main(["export", str(ckpt), "--edge", str(out), "--model", "sparsetorch.models.gpt:GPT"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    (tmp_path / "edge_gpt_factory.py").write_text(
        "from sparsetorch.models.gpt import GPT, GPTConfig\n"
        "def small():\n"
        "    return GPT(GPTConfig(layers=1, width=32, heads=2, context=32))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["export", str(ckpt), "--edge", str(out), "--model", "edge_gpt_factory:small"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    code = ("import sys, sparsetorch.edge as edge\n"
            f"text = edge.load({str(out)!r}).generate(b'abc', 8)\n"
            "assert 'torch' not in sys.modules\n"
            "sys.stdout.write(text.hex())\n")
    text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert bytes.fromhex(text) == torch_generate(model, b"abc", 8)


def test_cli_exports_a_shrunk_pruned_llama_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from sparsetorch.shrink import remove_mlp_channels, save_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                   initializer_range=0.5, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:20] *= 0.01
    remove_mlp_channels(model, 0.25, [ids], per_layer=True)  # per-block widths: sparsetorch's loader
    assert len({layer.mlp.up_proj.out_features for layer in model.model.layers}) > 1
    sparsetorch.prune(model, 0.7)
    folder = save_pretrained(model, tmp_path / "small")
    out = tmp_path / "small.spt"
    assert main(["export", str(folder), "--edge", str(out)]) == 0
    assert "bitmask" in capsys.readouterr().out
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
    assert edge.load(out).generate(ids[0].tolist(), 12) == want
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert main(["export", str(tmp_path / "gpt2"), "--edge", str(out)]) == 2
    assert "export_onnx" in capsys.readouterr().err
