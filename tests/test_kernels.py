"""Compiled sparse kernels vs dense fp32: every ISA, format, batch shape and index width; and the torch fallback."""
import pytest
import torch
import torch.nn.functional as F

from sparsetorch import SparsityError
from sparsetorch.kernels import (BSRWeight, CSRWeight, NMWeight, inference_ops, extension_isa, has_extension, index_bits,
                                 pack, sparse_linear)

needs_ext = pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")
ISAS = [isa for isa in ("generic", "avx2", "avx512")
        if has_extension() and inference_ops.ISAS.index(isa) <= inference_ops.ISAS.index(extension_isa())]


def sparse_weight(out, inp, density, gen, empty_rows=()):
    w = torch.randn(out, inp, generator=gen)
    w[torch.rand(out, inp, generator=gen) >= density] = 0
    for r in empty_rows:
        w[r] = 0
    return w


def close(a, b, inp):
    tol = 1e-5 * max(inp, 1) ** 0.5 * (1 + float(b.abs().max()))
    return float((a - b).abs().max()) <= tol


SHAPES = [(1, 1), (7, 5), (37, 53), (64, 96), (130, 300), (17, 1000)]
BATCHES = [1, 2, 3, 16, 17, 33, 64, 100]


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out,inp", SHAPES)
def test_csr_matches_dense(isa, out, inp):
    g = torch.Generator().manual_seed(out * 1000 + inp)
    w = sparse_weight(out, inp, 0.3, g, empty_rows=[0] if out > 2 else [])
    p = pack(w, "csr")
    assert p.indices.dtype == torch.int16 and torch.equal(p.to_dense(), w)
    bias = torch.randn(out, generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, inp, generator=g)
        for b in (None, bias):
            ref = F.linear(x, w, b)
            for tile, threads in ((1, 1), (2, 2), (4, 1)):
                y = inference_ops.csr_linear(x, p.indptr, p.indices, p.values, out, b, isa=isa, tile=tile, threads=threads)
                assert close(y, ref, inp), (batch, tile, threads)


@needs_ext
def test_all_zero_and_dense_weights():
    g = torch.Generator().manual_seed(0)
    for w in (torch.zeros(20, 40), torch.randn(20, 40, generator=g)):
        x = torch.randn(5, 40, generator=g)
        for fmt, kw in (("csr", {}), ("bsr", {"r": 4, "c": 4}), ("nm", {"n": 4, "m": 4})):
            p = pack(w, fmt, **kw)
            assert close(p.linear(x), x @ w.t(), 40) and close(p.linear(x[:1]), x[:1] @ w.t(), 40)


@needs_ext
def test_non_contiguous_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    w = sparse_weight(48, 70, 0.2, g)
    p = pack(w)
    big = torch.randn(9, 140, generator=g)
    for x in (big[:, ::2], big[:, :70], torch.randn(70, 9, generator=g).t(), big[::3, 1::2]):
        assert not x.is_contiguous()
        assert close(sparse_linear(x, p), x @ w.t(), 70)
    x3 = torch.randn(2, 3, 70, generator=g)
    assert sparse_linear(x3, p).shape == (2, 3, 48)
    assert close(sparse_linear(x3, p), x3 @ w.t(), 70)


def test_index_width_selection():
    assert index_bits(65536) == 16 and index_bits(65537) == 32
    g = torch.Generator().manual_seed(2)
    for inp, dtype in ((65536, torch.int16), (70000, torch.int32)):
        w = torch.zeros(3, inp)
        cols = torch.tensor([0, 1, 32767, 32768, 40000, 65535] + ([65536, 69999] if inp > 65536 else []))
        w[0, cols] = torch.randn(len(cols), generator=g)
        w[2, -1] = 2.0
        p = CSRWeight.from_dense(w)
        assert p.indices.dtype == dtype and torch.equal(p.to_dense(), w)
        x = torch.randn(2, inp, generator=g)
        for backend in (["ext"] if has_extension() else []) + ["torch"]:
            assert close(sparse_linear(x, p, backend=backend), x @ w.t(), 16)
            assert close(sparse_linear(x[:1], p, backend=backend), x[:1] @ w.t(), 16)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 8), (4, 16), (5, 32)])
def test_nm_matches_dense(isa, n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    out, inp = 23, 4 * m + m * (3 if m < 16 else 1)  # row length not a multiple of 16
    scores = torch.rand(out, inp // m, m, generator=g)
    keep = scores.argsort(-1)[..., :n]
    w = torch.zeros(out, inp // m, m).scatter_(-1, keep, torch.randn(out, inp // m, n, generator=g))
    w = w.reshape(out, inp)
    w[1] = 0  # a row with fewer than n per group packs with zero padding
    p = NMWeight.from_dense(w, n, m)
    assert p.values.shape == (out, inp // m * n) and torch.equal(p.to_dense(), w)
    bias = torch.randn(out, generator=g)
    for batch in (1, 3, 16, 40):
        x = torch.randn(batch, inp, generator=g)
        y = inference_ops.nm_linear(x, p.values, p.offsets, n, m, bias, isa=isa, tile=2)
        assert close(y, F.linear(x, w, bias), inp)
    assert close(p.linear(x, bias, "torch"), F.linear(x, w, bias), inp)


def test_nm_rejects_wrong_pattern():
    w = torch.ones(4, 8)
    with pytest.raises(ValueError):
        NMWeight.from_dense(w, 2, 4)
    with pytest.raises(ValueError):
        NMWeight.from_dense(torch.zeros(4, 6), 2, 4)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("r,c", [(16, 16), (4, 4), (1, 16), (8, 8), (2, 3), (32, 1)])
def test_bsr_matches_dense(isa, r, c):
    g = torch.Generator().manual_seed(r * 100 + c)
    out, inp = 2 * r * 3, c * 11
    blocks = torch.rand(out // r, inp // c, generator=g) < 0.3
    blocks[0] = False  # an empty block row
    w = torch.randn(out, inp, generator=g) * blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)
    p = BSRWeight.from_dense(w, r, c)
    assert p.block == (r, c) and torch.equal(p.to_dense(), w)
    bias = torch.randn(out, generator=g)
    for batch in (1, 5, 16, 40):
        x = torch.randn(batch, inp, generator=g)
        for tile in (1, 4):
            y = inference_ops.bsr_linear(x, p.indptr, p.indices, p.values, out, bias, isa=isa, tile=tile)
            assert close(y, F.linear(x, w, bias), inp), (batch, tile)


def test_torch_fallback_matches_dense_and_extension():
    g = torch.Generator().manual_seed(3)
    w = sparse_weight(40, 64, 0.25, g)
    x = torch.randn(6, 64, generator=g)
    bias = torch.randn(40, generator=g)
    ref = F.linear(x, w, bias)
    wb = w * (torch.rand(10, 16, generator=g) < 0.4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    for p, dense in ((pack(w, "csr"), w), (pack(wb, "bsr", r=4, c=4), wb)):
        ref = F.linear(x, dense, bias)
        y_torch = p.linear(x, bias, "torch")
        assert close(y_torch, ref, 64)
        if has_extension():
            assert close(p.linear(x, bias, "ext"), y_torch, 64)


def test_disable_env_forces_fallback(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w = sparse_weight(16, 32, 0.3, g)
    x = torch.randn(3, 32, generator=g)
    monkeypatch.setenv("SPARSETORCH_DISABLE_EXT", "1")
    assert not has_extension() and extension_isa() is None
    assert close(sparse_linear(x, pack(w)), x @ w.t(), 32)  # auto -> torch
    with pytest.raises(SparsityError):
        sparse_linear(x, pack(w), backend="ext")


@needs_ext
def test_isa_cap_env(monkeypatch):
    monkeypatch.setenv("SPARSETORCH_ISA", "generic")
    inference_ops.refresh()
    try:
        assert extension_isa() == "generic"
        g = torch.Generator().manual_seed(5)
        w = sparse_weight(16, 32, 0.3, g)
        x = torch.randn(3, 32, generator=g)
        assert close(sparse_linear(x, pack(w)), x @ w.t(), 32)
    finally:
        monkeypatch.delenv("SPARSETORCH_ISA")
        inference_ops.refresh()


@needs_ext
def test_bad_inputs_raise():
    p = pack(torch.eye(4))
    with pytest.raises(ValueError):
        p.linear(torch.randn(2, 5))
    with pytest.raises(ValueError):
        inference_ops.csr_linear(torch.randn(2, 4, dtype=torch.float64), p.indptr, p.indices, p.values, 4)
    assert close(p.linear(torch.ones(2, 4, dtype=torch.float64)), torch.ones(2, 4), 4)  # cast to float32
    with pytest.raises(ValueError):
        pack(torch.eye(4), "bsr", r=3, c=3)
    with pytest.raises(ValueError):
        pack(torch.eye(4), "coo")


def test_cli_bench_prints_table(capsys):
    from sparsetorch.cli.main import main

    assert main(["bench", "--shape", "64x256", "--sparsity", "0.5,0.9", "--batch", "1,3", "--min-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch-csr" in out and "dense (ms)" in out and ("csr" in out.replace("torch-csr", "")) == has_extension()
    assert main(["bench", "--shape", "64by256"]) == 2
    assert main(["bench", "--sparsity", "1.5"]) == 2


def test_caches_follow_buffer_changes():
    # load_state_dict copies in place (same addresses): cached kernel arguments / torch tensors must follow
    g = torch.Generator().manual_seed(6)
    w1 = torch.zeros(8, 16)
    w1[:, :2] = torch.randn(8, 2, generator=g)
    w2 = torch.zeros(8, 16)
    w2[:, -2:] = torch.randn(8, 2, generator=g)  # same nnz per row, other columns
    p1, p2 = pack(w1), pack(w2)
    x = torch.randn(3, 16, generator=g)
    for backend in (["ext"] if has_extension() else []) + ["torch"]:
        p = pack(w1)
        assert close(p.linear(x, None, backend), x @ w1.t(), 16)
        p.load_state_dict(p2.state_dict())
        assert close(p.linear(x, None, backend), x @ w2.t(), 16), backend
    assert p1.storage_key() != p2.storage_key()
