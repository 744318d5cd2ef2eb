"""Fused chains: one native call for Linear (+ activation) runs; outputs equal the masked dense model's."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetorch
from sparsetorch import SparsityWarning
from sparsetorch.inference.chain_discovery import find_sequential_chains
from sparsetorch.inference.fused_chain import ACTIVATIONS, FusedChain, pack_for_chain
from sparsetorch.inference import PackedLinear, clear_kernel_cache
from sparsetorch.kernels import has_extension
from sparsetorch.models import MLP
from sparsetorch.models.gpt import GPT, GPTConfig

needs_ext = pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")
FAST = {"budget_s": 0.005}


def sparse_weights(sizes, density=0.15, seed=0, pattern="random"):
    g = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for a, b in zip(sizes, sizes[1:]):
        w = torch.randn(b, a, generator=g)
        if pattern == "random":
            w = w * (torch.rand(b, a, generator=g) < density)
        elif pattern == "1:4":
            w = w * (torch.arange(a) % 4 == 1)
        elif pattern == "block8":
            keep = torch.rand(b // 8, a // 8, generator=g) < 0.3
            w = w * keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
        ws.append(w)
        bs.append(torch.randn(b, generator=g))
    return ws, bs


def reference(x, ws, bs, acts):
    for w, b, act in zip(ws, bs, acts):
        x = ACTIVATIONS[act][1](F.linear(x, w, b))
    return x


def close(a, b):
    assert a.shape == b.shape
    if not b.numel():
        return True
    return float((a - b).abs().max()) <= 1e-4 * (1 + float(b.abs().max()))


@needs_ext
@pytest.mark.parametrize("fmt,pattern", [("csr", "random"), ("nm:1:4", "1:4"), ("bsr:8x8", "block8"),
                                         ("dense", "random")])
@pytest.mark.parametrize("acts", [("relu", "relu", "none"), ("gelu", "gelu_tanh", "tanh"),
                                  ("sigmoid", "none", "gelu")])
def test_chain_matches_dense(fmt, pattern, acts):
    ws, bs = sparse_weights((64, 128, 96, 24), pattern=pattern)
    chain = FusedChain([pack_for_chain(w, fmt) for w in ws], bs, list(acts))
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for batch in (1, 5, 16, 64, 100):
                x = torch.randn(batch, 64, generator=g) * 3
                assert close(chain(x), reference(x, ws, bs, acts)), (t, batch)
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(7, 64, generator=g)
    assert close(chain.run_layers(x), reference(x, ws, bs, acts))  # the path without the extension


@needs_ext
def test_chain_inputs_any_layout_and_shape():
    ws, bs = sparse_weights((32, 48, 16))
    chain = FusedChain([pack_for_chain(w, "csr") for w in ws], bs, ["gelu", "none"])
    wide = torch.randn(40, 64)
    for x in (wide[:, ::2], wide[:, :32], wide.t()[:32].t(), torch.randn(3, 5, 32), torch.randn(32),
              torch.randn(0, 32), torch.randn(4, 32, dtype=torch.float64)):
        y = chain(x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 16)
        assert close(y.float(), reference(x.float(), ws, bs, ["gelu", "none"]))
    with pytest.raises(ValueError, match="expected inputs"):
        chain(torch.randn(2, 31))


@needs_ext
def test_chain_copy_state_dict_and_move():
    ws, bs = sparse_weights((16, 32, 8))
    chain = FusedChain([pack_for_chain(w, "csr") for w in ws], bs, ["relu", "none"])
    x = torch.randn(3, 16)
    ref = chain(x)
    twin = copy.deepcopy(chain)  # native handle dropped and rebuilt on the copy's own buffers
    assert twin._native is None and close(twin(x), ref)
    del chain
    assert close(twin(x), ref)
    other = FusedChain([pack_for_chain(torch.zeros_like(w), "csr") for w in ws], [torch.zeros_like(b) for b in bs],
                       ["relu", "none"])
    with pytest.raises(RuntimeError):  # different nonzero counts: the packed shapes differ
        other.load_state_dict(twin.state_dict())
    same = FusedChain([pack_for_chain(w, "csr") for w in ws], [torch.zeros_like(b) for b in bs], ["relu", "none"])
    same(x)
    same.load_state_dict(twin.state_dict())
    assert close(same(x), ref) and close(same.to(torch.float32)(x), ref)


def test_chain_bad_layers():
    ws, bs = sparse_weights((16, 32, 8))
    with pytest.raises(ValueError, match="do not connect"):
        FusedChain([pack_for_chain(ws[1], "csr"), pack_for_chain(ws[0], "csr")], [None, None], ["relu", "none"])
    with pytest.raises(ValueError, match="unsupported activation"):
        FusedChain([pack_for_chain(ws[0], "csr")], [None], ["swish"])


def test_sequential_chain_detection():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 8), nn.GELU(approximate="tanh"),
                        nn.LayerNorm(8), nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 2), nn.SiLU())
    chains = find_sequential_chains(seq, lambda m: isinstance(m, nn.Linear))
    assert chains == [[("0", "relu"), ("3", "gelu_tanh")], [("6", "tanh"), ("8", "none")]]


def pruned(model, sparsity=0.9):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        sparsetorch.prune(model, sparsity, generator=torch.Generator().manual_seed(0))
    return model


def dense_copy(model):
    d = copy.deepcopy(model)
    sparsetorch.remove_masks(d)
    return d.eval()


@needs_ext
def test_exact_bitmask_layers_join_chains_and_lossy_ones_do_not():
    """to_inference may time the float32 bitmask kernel fastest for a layer (a busy CPU made it win for the digits
    MLP's fc1, which then fell out of its chain); its weights are exact, so it chains like CSR. Rounded values
    (bf16) stay out: a chain would store them as float32 again."""
    from sparsetorch.inference.chain_decision import linear_predicate
    from sparsetorch.inference.packed_modules import PackedLinear
    from sparsetorch.kernels.bitmask_weight import BitmaskWeight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * (torch.rand(32, 64, generator=g) < 0.1)
    is_linear = linear_predicate(0.3)
    exact = PackedLinear(64, 32, None, "bitmask", BitmaskWeight.from_dense(w))
    rounded = PackedLinear(64, 32, None, "bitmask", BitmaskWeight.from_dense(w, values="bf16"))
    assert is_linear(exact) and not is_linear(rounded)


@needs_ext
@pytest.mark.parametrize("batch", [1, 64])
def test_to_inference_fuses_the_digits_mlp(batch):
    torch.manual_seed(0)
    model = pruned(MLP((64, 256, 256, 10)))
    x = torch.randn(batch, 64)
    inf = sparsetorch.to_inference(model, x, fuse="always")
    assert isinstance(inf, MLP)  # the model's own class (Sequential children replaced)
    rows = [r for r in inf.sparsetorch_plan if r["type"] == "FusedChain"]
    assert len(rows) == 1 and rows[0]["layers"] == ["fc1", "fc2", "classifier"]
    assert rows[0]["activations"] == ["relu", "relu", "none"]
    assert isinstance(inf.get_submodule(rows[0]["layer"]), FusedChain) and len(list(inf.children())) == 1
    dense = dense_copy(model)
    with torch.no_grad():
        for b in (1, 3, 64):  # other batch sizes too, and a [B, 1, 8, 8] input (MLP flattens it)
            xb = torch.randn(b, 1, 8, 8)
            assert close(inf(xb), dense(xb))
    measured = sparsetorch.to_inference(model, x, **FAST)  # fused or not as timed; same outputs either way
    unfused = sparsetorch.to_inference(model, x, fuse=False, **FAST)
    assert not any(isinstance(m, FusedChain) for m in unfused.modules())
    with torch.no_grad():
        xs = torch.randn(batch, 80)[:, 8:72]  # non-contiguous rows
        for m in (measured, unfused):
            assert close(m(x), dense(x)) and close(m(xs), dense(xs))
        assert close(inf(xs), unfused(xs))


class Functional(nn.Module):
    """A forward that calls its layers with functional activations (found through torch.fx)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.hidden = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):  # x: [B, T, 32]
        h = F.gelu(self.inp(x))
        h = torch.sigmoid(self.hidden(h))
        return self.out(h) + 1.0


@needs_ext
def test_to_inference_fuses_a_traced_forward():
    torch.manual_seed(0)
    model = pruned(Functional(), 0.8)
    x = torch.randn(2, 5, 32)
    inf = sparsetorch.to_inference(model, x, fuse="always")
    assert isinstance(inf, Functional)
    fused = [m for m in inf.modules() if isinstance(m, FusedChain)]
    assert len(fused) == 1 and fused[0].acts == ["gelu", "sigmoid", "none"]
    assert not hasattr(inf, "hidden")  # the fused layers' weights are not kept twice
    with torch.no_grad():
        assert close(inf(x), dense_copy(model)(x))
        assert close(inf(x[:1, :2]), dense_copy(model)(x[:1, :2]))


@needs_ext
def test_gpt_mlp_blocks_fused_with_3d_inputs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, width=32, heads=2, context=16))
    pruned(model)
    ids = torch.randint(0, 256, (2, 12))
    inf = sparsetorch.to_inference(model, ids, fuse="always")
    assert isinstance(inf, GPT)
    assert sum(isinstance(m, FusedChain) for m in inf.modules()) == 2  # c_fc -> gelu -> proj of each block
    assert isinstance(inf.blocks[0].attn.qkv, (PackedLinear, nn.Linear))
    with torch.no_grad():
        assert close(inf(ids), dense_copy(model)(ids))
        assert close(inf(ids[:1, :3]), dense_copy(model)(ids[:1, :3]))


def test_no_fusion_without_extension(monkeypatch):
    monkeypatch.setenv("SPARSETORCH_DISABLE_EXT", "1")
    clear_kernel_cache()
    torch.manual_seed(0)
    model = pruned(MLP((64, 128, 10)))
    x = torch.randn(4, 64)
    inf = sparsetorch.to_inference(model, x, fuse="always")
    assert not any(isinstance(m, FusedChain) for m in inf.modules())
    with torch.no_grad():
        assert close(inf(x), dense_copy(model)(x))
    # a chain built while the extension is disabled runs its layers on torch's kernels
    ws, bs = sparse_weights((64, 32, 8))
    chain = FusedChain([pack_for_chain(w, "csr") for w in ws], bs, ["relu", "none"])
    assert close(chain(x), reference(x, ws, bs, ["relu", "none"])) and chain._native is False
    clear_kernel_cache()


@needs_ext
def test_chain_every_isa(monkeypatch):
    """Portable, AVX2 and AVX-512 builds of the chain kernels (activations, transposes, dense rows) agree."""
    from sparsetorch.kernels import inference_ops

    ws, bs = sparse_weights((40, 72, 24, 9), density=0.3)
    acts = ["gelu", "sigmoid", "tanh"]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(b, 40, generator=g) * 2 for b in (1, 19, 70)]
    for level in range(inference_ops.ISAS.index(inference_ops.best_isa()) + 1):
        monkeypatch.setattr(inference_ops, "isa_level", lambda level=level: level)
        for fmt in ("csr", "dense"):
            chain = FusedChain([pack_for_chain(w, fmt) for w in ws], bs, acts, threads=1)
            for x in xs:
                assert close(chain(x), reference(x, ws, bs, acts)), (level, fmt, x.shape)


@needs_ext
def test_chain_threaded_schedules():
    """Two threads: batch-1 and small-batch chains big enough to share every layer's rows (barrier between
    layers), and whole panels per thread at larger batches, for CSR, BSR and dense layers."""
    ws, bs = sparse_weights((256, 512, 384, 64), density=0.3, seed=4)
    acts = ["relu", "gelu", "none"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        for fmts in (["csr", "csr", "csr"], ["dense", "csr", "dense"]):
            chain = FusedChain([pack_for_chain(w, f) for w, f in zip(ws, fmts)], bs, acts)
            for batch in (1, 5, 16, 33, 128):
                x = torch.randn(batch, 256, generator=g)
                assert close(chain(x), reference(x, ws, bs, acts)), (fmts, batch)
        wb, bb = sparse_weights((256, 512, 128), pattern="block8", seed=6)
        chain = FusedChain([pack_for_chain(w, "bsr:8x8") for w in wb], bb, ["tanh", "none"])
        for batch in (1, 7, 64):
            x = torch.randn(batch, 256, generator=g)
            assert close(chain(x), reference(x, wb, bb, ["tanh", "none"])), batch
    finally:
        torch.set_num_threads(threads)
