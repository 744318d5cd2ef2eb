"""SparseLinear on compressed weights: kernels and torch fallback agree with a masked dense Linear,
gradcheck passes in float64, conversions keep models, optimizers and state_dicts working."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.sparse_training import SparseLinear, has_kernels, to_dense, to_sparse_training
from sparsetorch.sparse_training.functional import SparseLinearFunction

BACKENDS = ["torch", pytest.param("kernels", marks=pytest.mark.skipif(not has_kernels(), reason="no _train ext"))]


def _reference(layer: SparseLinear, x: torch.Tensor, dy: torch.Tensor):
    """Outputs and gradients of the equivalent masked dense Linear."""
    w = layer.dense_weight().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = nn.functional.linear(xr, w, None if layer.bias is None else layer.bias.detach())
    y.backward(dy)
    return y.detach(), xr.grad, w.grad.flatten()[layer.flat_positions()]


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.values.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(37, 19, 1), (64, 128, 17), (200, 96, 300)])
def test_matches_masked_dense(backend, dtype, shape):
    fin, fout, batch = shape
    g = torch.Generator().manual_seed(sum(shape))
    layer = SparseLinear(fin, fout, 0.8, generator=g, dtype=dtype, backend=backend)
    x = torch.randn(batch, fin, generator=g, dtype=dtype)
    dy = torch.randn(batch, fout, generator=g, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(_run(layer, x, dy), _reference(layer, x, dy)):
        torch.testing.assert_close(got, want, **tol)
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, dy.sum(0), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_input_gradient_paths_match(backend, monkeypatch):
    # dX by scatter over W's rows (most layers) and by gather over the transposed map (very sparse layers)
    g = torch.Generator().manual_seed(11)
    layer = SparseLinear(300, 500, 0.985, generator=g, backend=backend)
    x, dy = torch.randn(70, 300, generator=g), torch.randn(70, 500, generator=g)
    assert layer.has_transposed_map and layer.t_perm.numel() == layer.nnz
    gather = _run(layer, x, dy)
    monkeypatch.setattr(SparseLinear, "has_transposed_map", property(lambda self: False))  # force scatter
    scatter = _run(layer, x, dy)
    for a, b, want in zip(gather, scatter, _reference(layer, x, dy)):
        torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(0)
    layer = SparseLinear(10, 7, 0.6, generator=g, dtype=torch.float64, backend=backend)
    x = torch.randn(4, 10, dtype=torch.float64, generator=g, requires_grad=True)
    fn = SparseLinearFunction.apply
    use = backend == "kernels"
    assert torch.autograd.gradcheck(lambda x, v, b: fn(x, v, b, layer, use), (x, layer.values, layer.bias))


@pytest.mark.skipif(not has_kernels(), reason="no _train extension")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_isa_agrees(isa, monkeypatch):
    from sparsetorch.kernels import loader
    from sparsetorch.kernels import training_ops

    if not loader.cpu_has(isa, loader.TRAINING):
        pytest.skip(f"this CPU has no {isa}")  # capped to a lower ISA, the test would pass without running it
    monkeypatch.setenv("SPARSETORCH_ISA", isa)
    loader.refresh()
    g = torch.Generator().manual_seed(1)
    layer = SparseLinear(70, 50, 0.7, generator=g, backend="kernels")
    x, dy = torch.randn(33, 70, generator=g), torch.randn(33, 50, generator=g)
    assert training_ops.isa_level() <= ("generic", "avx2", "avx512").index(isa)
    try:
        for got, want in zip(_run(layer, x, dy), _reference(layer, x, dy)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv("SPARSETORCH_ISA")
        loader.refresh()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_3d_inputs(backend):
    g = torch.Generator().manual_seed(2)
    layer = SparseLinear(24, 16, 0.5, generator=g, backend=backend)
    base = torch.randn(24, 2, 7, generator=g)
    x = base.permute(1, 2, 0)  # [2, 7, 24], last dim strided
    assert not x.is_contiguous()
    dy = torch.randn(2, 7, 16, generator=g)
    y, dx, dw = _run(layer, x, dy)
    ry, rdx, rdw = _reference(layer, x.reshape(14, 24), dy.reshape(14, 16))
    torch.testing.assert_close(y.reshape(14, 16), ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.reshape(14, 24), rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    # a row view with a larger stride (every other row of a bigger batch) takes the strided pack path
    xs = torch.randn(20, 24, generator=g)[::2]
    torch.testing.assert_close(layer(xs), nn.functional.linear(xs, layer.dense_weight(), layer.bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_upstream_gradient(backend):
    # (y * c).sum() hands backward dY = c expanded over the batch: row stride 0, unit column stride
    g = torch.Generator().manual_seed(8)
    layer = SparseLinear(20, 12, 0.5, generator=g, backend=backend)
    c = torch.randn(12, generator=g)
    x = torch.randn(6, 20, generator=g)
    dy = c.expand(6, 12)
    assert dy.stride() == (0, 1)
    x1 = x.clone().requires_grad_(True)
    (layer(x1) * c).sum().backward()
    _, rdx, rdw = _reference(layer, x, dy.contiguous())
    torch.testing.assert_close(x1.grad, rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, rdw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_columns_allowed(backend):
    g = torch.Generator().manual_seed(3)
    layer = SparseLinear(40, 30, 0.99, generator=g, backend=backend)  # 12 nonzeros: most rows/columns empty
    assert layer.nnz == 12
    x, dy = torch.randn(9, 40, generator=g), torch.randn(9, 30, generator=g)
    for got, want in zip(_run(layer, x, dy), _reference(layer, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_layers_get_32bit_indices(backend):
    g = torch.Generator().manual_seed(4)
    wide_in = SparseLinear(40000, 3, 0.999, generator=g, backend=backend)
    wide_out = SparseLinear(3, 40000, 0.999, generator=g, backend=backend)
    assert wide_in.has_transposed_map and wide_out.has_transposed_map  # 0.1% dense: dX by gather
    assert wide_in.indices.dtype == torch.int32 and wide_in.t_indices.dtype == torch.int16
    assert wide_out.indices.dtype == torch.int16 and wide_out.t_indices.dtype == torch.int32
    assert int(wide_in.indices.max()) > 32767  # positions beyond 16 bits are really used
    for layer, fin, fout in ((wide_in, 40000, 3), (wide_out, 3, 40000)):
        x, dy = torch.randn(5, fin, generator=g), torch.randn(5, fout, generator=g)
        for got, want in zip(_run(layer, x, dy), _reference(layer, x, dy)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_input_errors():
    with pytest.raises(SparsityError, match="float32 and float64"):
        SparseLinear(8, 8, 0.5, dtype=torch.float16)
    with pytest.raises(SparsityError, match="sparsity"):
        SparseLinear(8, 8, 1.0)
    layer = SparseLinear(8, 4, 0.5)
    with pytest.raises(SparsityError, match="dtype"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(SparsityError, match="inputs"):
        layer(torch.randn(2, 7))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)).half()
    with pytest.raises(SparsityError, match="float"):
        to_sparse_training(model, 0.5)
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))  # nothing half-changed


def test_fallback_when_extension_disabled(monkeypatch):
    monkeypatch.setenv("SPARSETORCH_DISABLE_EXT", "1")
    assert not has_kernels()
    layer = SparseLinear(16, 8, 0.5, generator=torch.Generator().manual_seed(5))
    with pytest.raises(SparsityError, match="backend='kernels'"):
        SparseLinear(16, 8, 0.5, backend="kernels")(torch.randn(2, 16))
    x, dy = torch.randn(4, 16), torch.randn(4, 8)
    for got, want in zip(_run(layer, x, dy), _reference(layer, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    """A pre-norm transformer block built from nn.Linear: q/k/v/o projections and a 4x MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):  # x: [B, T, d]
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.lm_head(self.blocks(self.emb(ids)))


def test_transformer_swap_train_and_back():
    torch.manual_seed(0)
    model = TinyLM()
    dense_params = sum(p.numel() for p in model.parameters())
    to_sparse_training(model, 0.9, "erk", generator=torch.Generator().manual_seed(0))
    sparse = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 12 and isinstance(model.lm_head, nn.Linear)  # every projection, not the head
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * dense_params
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)  # the scheduler drives the new parameters
    layer = model.blocks[0].fc1
    assert opt.state[layer.values]["exp_avg"].shape == (layer.nnz,)  # optimizer state sized by nnz
    assert layer.values.grad.shape == (layer.nnz,)
    # to_dense: same function, dense Linear with zeros at the pruned positions
    with torch.no_grad():
        before = model(ids)
        w = layer.dense_weight()
        to_dense(model)
        assert type(model.blocks[0].fc1) is nn.Linear
        torch.testing.assert_close(model.blocks[0].fc1.weight, w)
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_state_dict_roundtrip_and_dense_load():
    g = torch.Generator().manual_seed(6)
    model = to_sparse_training(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.Linear(30, 4)),
                               0.8, generator=g)
    sd = model.state_dict()
    assert {"0.values", "0.indptr", "0.indices", "0.bias"} <= set(sd) and "0.t_perm" not in sd
    other = to_sparse_training(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.Linear(30, 4)),
                               0.8, generator=torch.Generator().manual_seed(7))
    other.load_state_dict(sd)
    x = torch.randn(3, 20)
    torch.testing.assert_close(other(x), model(x))
    assert not model[0].has_transposed_map and other[0].t_perm.numel() == 0  # 20% dense: dX by scatter
    # a dense checkpoint (to_dense of a copy) loads into the sparse model: same connectivity and outputs
    dense_sd = to_dense(to_sparse_training(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30),
                                                         nn.Linear(30, 4)), 0.8)).state_dict()
    dense_sd.update({k: v for k, v in sd.items() if k.startswith("3.")})
    for prefix in ("0.", "2."):
        dense_sd[prefix + "weight"] = model[int(prefix[0])].dense_weight()
        dense_sd[prefix + "bias"] = model[int(prefix[0])].bias.detach()
    other.load_state_dict(dense_sd)
    torch.testing.assert_close(other(x), model(x))
    torch.testing.assert_close(other[0].indices, model[0].indices)


def test_public_api_registered():
    assert sparsetorch.SparseLinear is SparseLinear
    assert sparsetorch.to_sparse_training is to_sparse_training and sparsetorch.to_dense is to_dense


def test_param_groups_scale_lr_and_decay_by_density():
    g = torch.Generator().manual_seed(12)
    model = to_sparse_training(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4)),
                               0.8, distribution="erk", generator=g)
    groups = sparsetorch.sparse_param_groups(model, lr=1e-3, weight_decay=0.1)
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.1
    sparse = [m for m in model if isinstance(m, SparseLinear)]
    assert len(groups) == 1 + len(sparse)
    for group, layer in zip(groups[1:], sparse):
        assert group["params"] == [layer.values]
        assert group["lr"] == pytest.approx(1e-3 / layer.density)
        assert group["lr"] * group["weight_decay"] == pytest.approx(1e-3 * 0.1)  # AdamW's decay per step kept
    covered = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.randn(8, 32)).square().mean().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5e-3 / sparse[0].density)
    with pytest.raises(SparsityError, match="no SparseLinear"):
        sparsetorch.sparse_param_groups(nn.Linear(3, 3), lr=1e-3)
    with pytest.raises(SparsityError, match="lr > 0"):
        sparsetorch.sparse_param_groups(model, lr=0.0)


def test_rescale_restores_the_dense_output_scale():
    g = torch.Generator().manual_seed(13)
    plain = to_sparse_training(nn.Sequential(nn.Linear(400, 300)), 0.9, generator=torch.Generator().manual_seed(1))[0]
    scaled = to_sparse_training(nn.Sequential(nn.Linear(400, 300)), 0.9, rescale=True,
                                generator=torch.Generator().manual_seed(1))[0]
    x = torch.randn(256, 400, generator=g)
    with torch.no_grad():
        ratio = ((scaled(x) - scaled.bias).std() / (plain(x) - plain.bias).std()).item()
    assert ratio == pytest.approx(10 ** 0.5, rel=0.1)  # sqrt(in / kept fan-in) at density 0.1
