"""The torch-free edge runtime: exported models reproduce torch, bad input fails clearly, no torch import."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch import nn

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.edge.linear import compiled_kernels
from sparsetorch.edge.weights import decode_matrix, encode_matrix
from sparsetorch.export.edge import export_edge
from sparsetorch.errors import SparsityError
from sparsetorch.models import MLP, SmallCNN
from sparsetorch.recipes.training_loop import fit

BACKENDS = ["auto", "numpy", "dense"] + (["compiled"] if compiled_kernels() is not None else [])
# int8 end-to-end bound on the trained digits MLP at 90%, |logit error| / max|logit|: measured 0.0015
# (`pytest tests/test_edge.py -s -k int8_digits` prints it); the bound leaves ~6x headroom
INT8_REL_BOUND = 0.01


@pytest.fixture(scope="module")
def digits():
    from sparsetorch.data import load_digits_split

    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def mlp90(digits):
    torch.manual_seed(0)
    model = fit(MLP(), digits.x_train, digits.y_train, epochs=3, generator=torch.Generator().manual_seed(0))
    sparsetorch.prune(model, 0.9)
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_mlp_90_matches_torch(mlp90, digits, tmp_path, backend):
    path = tmp_path / "mlp.spt"
    desc = export_edge(mlp90, digits.x_test[:1], path)
    assert {m["layout"] for m in desc["tensors"].values()} & {"csr", "bitmask"}  # pruned weights stored sparse
    model = edge.load(path, backend=backend)
    with torch.no_grad():
        want = mlp90(digits.x_test).numpy()
    got = model(digits.x_test.numpy())
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for rows in (1, 2, 3):  # the numpy backend takes another path for 1-2 rows (gather + reduceat)
        np.testing.assert_allclose(model(digits.x_test[:rows].numpy()), want[:rows], rtol=1e-5, atol=1e-5)
    # smaller than the dense fp32 weights it replaces
    dense_bytes = sum(p.numel() * 4 for p in mlp90.parameters())
    assert path.stat().st_size < 0.5 * dense_bytes


def test_small_cnn_matches_torch(tmp_path):
    torch.manual_seed(1)
    cnn = SmallCNN().eval()
    sparsetorch.prune(cnn, 0.8)
    path = tmp_path / "cnn.spt"
    export_edge(cnn, torch.zeros(1, 1, 8, 8), path)
    x = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(2))  # another batch size than exported
    with torch.no_grad():
        want = cnn(x).numpy()
    for backend in BACKENDS:
        np.testing.assert_allclose(edge.load(path, backend=backend)(x.numpy()), want, rtol=1e-5, atol=1e-5)


class OpsNet(nn.Module):
    """Every op family of the runtime: folded BatchNorm, grouped/strided/dilated convs, pools, norms, residuals."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding="same")
        self.bn1 = nn.BatchNorm1d(8)
        self.mpool = nn.MaxPool1d(3, stride=2, padding=1)
        self.c2 = nn.Conv2d(2, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fa = nn.Linear(64, 16)
        self.fb = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.GELU(approximate="tanh"), nn.Dropout(0.3), nn.Linear(16, 16), nn.SiLU())
        self.out = nn.Linear(32, 6)
        self.soft = nn.Softmax(dim=-1)

    def forward(self, x):  # x: [B, 2, 16]
        a = self.mpool(F.gelu(self.bn1(self.c1(x))))  # [B, 8, 8]
        img = x.view(x.size(0), 2, 4, 4)
        b = self.gap(self.pool(torch.sigmoid(self.bn2(self.c2(img)))))  # [B, 8, 1, 1]
        y = self.ln(self.fa(torch.tanh(a).reshape(-1, 64)) + self.fb(b.flatten(1)).relu())
        y = y + self.head(y) * 0.5  # residual
        y = torch.cat([y, y.transpose(0, 1).permute(1, 0) - 1.0], dim=1)
        return self.soft(self.out(y) / 2.0)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))


def test_every_op_matches_torch_and_batchnorm_is_folded(tmp_path):
    torch.manual_seed(4)
    net = OpsNet()
    _randomize_bn(net)
    sparsetorch.prune(net, 0.5)
    net.train()  # export evaluates in eval mode and restores the flags
    desc = export_edge(net, torch.zeros(1, 2, 16), tmp_path / "ops.spt")
    assert net.training and net.head[1].training
    ops = {n["op"] for n in desc["nodes"]}
    assert "affine" not in ops and {"conv", "pool", "mean", "layer_norm", "softmax", "binary", "concat"} <= ops
    net.eval()
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = net(x).numpy()
    for backend in BACKENDS:
        np.testing.assert_allclose(edge.load(tmp_path / "ops.spt", backend=backend)(x.numpy()), want,
                                   rtol=1e-4, atol=1e-6)


def test_unfoldable_batchnorm_runs_as_affine(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 3))
    _randomize_bn(net)
    net.eval()
    desc = export_edge(net, torch.zeros(1, 3, 4), tmp_path / "bn.spt")
    assert "affine" in {n["op"] for n in desc["nodes"]}
    x = torch.randn(4, 3, 4)
    np.testing.assert_allclose(edge.load(tmp_path / "bn.spt")(x.numpy()), net(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("density", [0.02, 0.1, 1.0])
def test_weight_layouts_round_trip_and_pick_the_smallest(density):
    g = np.random.default_rng(0)
    w = (g.standard_normal((40, 300)) * (g.random((40, 300)) < density)).astype(np.float32)
    w[3] = 0  # an empty row
    parts, meta = encode_matrix(w)
    assert meta["layout"] == {0.02: "csr", 0.1: "bitmask", 1.0: "dense"}[density]
    if meta["layout"] == "csr":
        assert parts["indices"].dtype == np.uint16
    np.testing.assert_array_equal(decode_matrix("w", parts, meta).to_dense(), w)
    assert sum(a.nbytes for a in parts.values()) <= w.nbytes


def test_int8_single_layer_error_is_within_the_rounding_bound():
    # per-row symmetric int8: |w - q*s| <= s/2 with s = max|w_row|/127, so |dy_i| <= s_i/2 * ||x||_1
    g = np.random.default_rng(1)
    w = (g.standard_normal((64, 200)) * (g.random((64, 200)) < 0.1)).astype(np.float32)
    x = g.standard_normal((8, 200)).astype(np.float32)
    parts, meta = encode_matrix(w, "int8")
    assert parts["values"].dtype == np.int8 and meta["values"] == "int8"
    wq = decode_matrix("w", parts, meta).to_dense()
    scale = np.abs(w).max(axis=1) / 127
    assert np.all(np.abs(wq - w) <= scale[:, None] / 2 + 1e-7)
    bound = np.abs(x).sum(axis=1, keepdims=True) * scale[None, :] / 2
    assert np.all(np.abs(x @ wq.T - x @ w.T) <= bound + 1e-5)


def test_int8_digits_bound(mlp90, digits, tmp_path):
    export_edge(mlp90, digits.x_test[:1], tmp_path / "fp32.spt")
    desc = export_edge(mlp90, digits.x_test[:1], tmp_path / "int8.spt", values="int8")
    assert desc["values"] == "int8"
    assert (tmp_path / "int8.spt").stat().st_size < 0.6 * (tmp_path / "fp32.spt").stat().st_size
    with torch.no_grad():
        want = mlp90(digits.x_test).numpy()
    got = edge.load(tmp_path / "int8.spt")(digits.x_test.numpy())
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"int8 relative logit error {rel:.4f}")
    assert rel < INT8_REL_BOUND
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_runtime_imports_no_torch(mlp90, tmp_path):
    path = tmp_path / "mlp.spt"
    export_edge(mlp90, torch.zeros(1, 64), path)
    x = np.linspace(0, 1, 3 * 64, dtype=np.float32).reshape(3, 64)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np\n"
            "import sparsetorch.edge\n"
            "assert 'torch' not in sys.modules\n"
            f"m = sparsetorch.edge.load({str(path)!r})\n"
            f"y = m(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with torch.no_grad():
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), mlp90(torch.from_numpy(x)).numpy(), atol=1e-5)


# -- bad input ----------------------------------------------------------------------------------------------
class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x):
        return self.rnn(self.fc(x))[0]


class WithCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=1)


@pytest.mark.parametrize("net, needle", [(WithLSTM(), "'rnn' (LSTM)"), (WithCumsum(), "cumsum")])
def test_unsupported_op_fails_at_export_naming_it(net, needle, tmp_path):
    with pytest.raises(SparsityError, match="not supported") as info:
        export_edge(net, torch.zeros(1, 4), tmp_path / "x.spt")
    assert needle in str(info.value)
    assert not (tmp_path / "x.spt").exists()


def test_other_version_and_other_files_are_rejected(mlp90, tmp_path):
    path = tmp_path / "m.spt"
    export_edge(mlp90, torch.zeros(1, 64), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    desc = json.loads(meta["sparsetorch.edge"])
    assert desc["version"] == 3  # its 90%-sparse layers are bitmasks in the decode kernels' layout (version 3)
    desc["version"] = 4
    save_file(load_file(str(path)), str(tmp_path / "v4.spt"), metadata={"sparsetorch.edge": json.dumps(desc)})
    with pytest.raises(SparsityError, match="version 4; this runtime reads versions 1, 2, 3 only"):
        edge.load(tmp_path / "v4.spt")
    sparsetorch.save(mlp90, tmp_path / "ckpt.safetensors")
    with pytest.raises(SparsityError, match="not a sparsetorch edge file"):
        edge.load(tmp_path / "ckpt.safetensors")
    (tmp_path / "junk.spt").write_bytes(b"not a file")
    with pytest.raises(SparsityError, match="not a readable safetensors"):
        edge.load(tmp_path / "junk.spt")
    with pytest.raises(SparsityError, match="no such file"):
        edge.load(tmp_path / "missing.spt")


def test_mismatched_input_shape_is_a_clear_error(mlp90, tmp_path):
    export_edge(mlp90, torch.zeros(1, 64), tmp_path / "m.spt")
    model = edge.load(tmp_path / "m.spt")
    with pytest.raises(SparsityError, match=r"shape \[2, 63\] but the model expects \[N, 64\]"):
        model(np.zeros((2, 63), np.float32))
    with pytest.raises(SparsityError, match="expects"):
        model(np.zeros(64, np.float32))
    with pytest.raises(SparsityError, match="feed-forward"):
        model.generate(b"hi", 2)


def test_bad_export_arguments(mlp90, tmp_path):
    with pytest.raises(SparsityError, match="values must be one of"):
        export_edge(mlp90, torch.zeros(1, 64), tmp_path / "m.spt", values="int4")
    with pytest.raises(SparsityError, match="one tensor input"):
        export_edge(mlp90, (torch.zeros(1, 64), torch.zeros(1)), tmp_path / "m.spt")
