"""Joint sparsification + quantization (SparseGPT section 4 with GPTQ's error feedback) and its exact storage:
grids, kept weights exactly on them, never worse than prune-then-round, bit-exact save/load of int8/int4 codes."""
import os

import pytest
import torch
from torch import nn

import sparsetorch
from sparsetorch.core.masks import get_mask, set_mask
from sparsetorch.core.patterns import is_valid_mask, parse_pattern
from sparsetorch.core.quant_grid import (QuantGridState, get_quant_grid, iter_quant_grids, remove_quant_grid,
                                         set_quant_grid)
from sparsetorch.errors import SparsityError
from sparsetorch.oneshot.quantize import QuantGrid, grid_codes, group_scales, quantize_to_grid, round_to_nearest
from sparsetorch.oneshot.solvers import inverse_hessian_cholesky, row_topk_mask, sparsegpt_solve

D, OUT = 256, 64


def correlated(seed, d=D, n=1024, out=OUT):
    """X = randn(n, d/4) @ randn(d/4, d) + 0.1 randn(n, d): strongly correlated inputs, where updates matter."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return torch.randn(out, d, generator=g), X, 2 * X.T @ X / n


def out_error(W0, W, X):
    return float(((W0 - W) @ X.T).square().sum())


def bits_of(t):
    return t.contiguous().view(torch.int32)


def assert_on_grid(W, keep, scales, grid):
    """Kept weights are q * scale bit for bit (float32) with |q| <= qmax; pruned ones are +0.0."""
    rows, cols = W.shape
    assert scales.shape == (rows, grid.n_groups(cols)) and scales.dtype == torch.float32
    assert torch.isfinite(scales).all() and (scales >= 0).all()
    codes, off = grid_codes(W, scales, grid)
    assert off == 0
    assert int(codes.abs().max()) <= grid.qmax
    full = scales.repeat_interleave(grid.width(cols), dim=1)[:, :cols]
    assert torch.equal(bits_of(codes.float() * full), bits_of(W))
    assert torch.equal(bits_of(W[~keep]), torch.zeros(int((~keep).sum()), dtype=torch.int32))


# -- the grid spec and the pure functions ----------------------------------------------------------------------
def test_quant_grid_validates_with_what_to_do():
    assert QuantGrid(8).qmax == 127 and QuantGrid(4, 32).qmax == 7
    assert QuantGrid(4, 32).n_groups(100) == 4 and QuantGrid(8).n_groups(100) == 1
    for bad in (3, 16, True, "8"):
        with pytest.raises(SparsityError, match="bits must be 8 or 4"):
            QuantGrid(bad)
    for bad in (0, -4, 1.5, True, "32"):
        with pytest.raises(SparsityError, match="positive integer"):
            QuantGrid(8, bad)
    with pytest.raises(SparsityError, match="larger than the layer's 64 inputs"):
        QuantGrid(8, 128).n_groups(64)
    with pytest.raises(SparsityError, match="larger than"):
        sparsegpt_solve(torch.randn(4, 64), torch.eye(64), 0.5, parse_pattern("unstructured"), grid=QuantGrid(8, 128))
    with pytest.raises(SparsityError, match="QuantGrid"):
        sparsegpt_solve(torch.randn(4, 64), torch.eye(64), 0.5, parse_pattern("unstructured"), grid=8)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 48)])
def test_group_scales_from_kept_weights_and_round_to_nearest(bits, group):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 100, generator=g)
    keep = torch.rand(16, 100, generator=g) < 0.5
    W[~keep] *= 100  # pruned weights must not widen the grid
    grid = QuantGrid(bits, group)
    scales = group_scales(W, keep, grid)
    width = grid.width(100)
    for r in range(16):
        for k in range(grid.n_groups(100)):
            cols = slice(k * width, (k + 1) * width)
            kept = W[r, cols][keep[r, cols]]
            want = kept.abs().max() / grid.qmax if kept.numel() else torch.tensor(0.0)
            assert scales[r, k] == want
    Wq, s2 = round_to_nearest(W, keep, grid)
    assert torch.equal(s2, scales)
    assert_on_grid(Wq, keep, scales, grid)
    full = scales.repeat_interleave(width, dim=1)[:, :100]
    assert ((Wq - W).abs()[keep] <= full[keep] / 2 * (1 + 1e-6)).all()  # nearest point, never clamped
    assert torch.equal(quantize_to_grid(Wq, scales, grid), Wq)  # on the grid: a fixed point


# -- joint sparse + quantized SparseGPT --------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (8, 128), (4, None), (4, 32), (4, 128)])
def test_joint_kept_values_exactly_on_grid(pattern, bits, group):
    W0, X, H = correlated(1, out=32)
    H[:, :3] = H[:3, :] = 0  # a few dead inputs
    grid = QuantGrid(bits, group)
    W, keep, damp, scales = sparsegpt_solve(W0, H, 0.5, parse_pattern(pattern), grid=grid)
    assert W.dtype == torch.float32 and damp > 0
    assert_on_grid(W, keep, scales, grid)
    if pattern == "2:4":
        assert is_valid_mask(keep, "2:4") and int(keep.sum()) == W.numel() // 2
    else:
        assert int((~keep).sum()) == round(0.5 * W.numel())  # exactly the layer's count


def test_joint_unstructured_odd_shapes_keep_exact_counts():
    W0, _, H = correlated(2, d=100, out=7)
    for density in (0.3, 0.77):
        W, keep, _, scales = sparsegpt_solve(W0, H, density, parse_pattern("unstructured"), block_size=32,
                                             grid=QuantGrid(4, 48))
        assert int(keep.sum()) == round(density * W.numel())
        assert_on_grid(W, keep, scales, QuantGrid(4, 48))


def test_joint_error_at_or_below_prune_then_round(capsys):
    """||(W0 - W) X||^2 of joint sparse + int8/int4 vs sparsegpt_solve without grid then round_to_nearest."""
    ratios = {}
    for pattern in ("unstructured", "2:4"):
        for bits in (8, 4):
            for group in (None, 32):
                for seed in range(3):
                    W0, X, H = correlated(seed, d=128, n=512, out=32)
                    grid = QuantGrid(bits, group)
                    Wj, kj, _, _ = sparsegpt_solve(W0, H, 0.5, parse_pattern(pattern), grid=grid)
                    Ws, ks, _ = sparsegpt_solve(W0, H, 0.5, parse_pattern(pattern))
                    Wr, _ = round_to_nearest(Ws, ks, grid)
                    joint, rtn = out_error(W0, Wj, X), out_error(W0, Wr, X)
                    assert joint <= rtn * (1 + 1e-5), (pattern, bits, group, seed, joint, rtn)
                    ratios.setdefault((pattern, bits, group), []).append(joint / rtn)
    with capsys.disabled():
        for key, r in ratios.items():
            print(f"\n  joint / prune-then-round {key}: " + " ".join(f"{x:.3f}" for x in r), end="")
        print()
    for (pattern, bits, group), r in ratios.items():
        if bits == 4:  # error feedback pays at 4 bits
            assert sum(r) / len(r) < 0.92, (pattern, group, r)


def _reference_sparsegpt(weight, hessian, density, pattern, block_size=128, damp=0.01):
    """sparsegpt_solve as it was before grids existed (commit 6c42833), verbatim but for the helper inlined."""
    W = weight.float().clone(memory_format=torch.contiguous_format)
    H = hessian.float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, used_damp = inverse_hessian_cholesky(H, damp)
    if pattern.kind == "nm":
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    total = (1.0 - density) * rows * cols
    edges = list(range(0, cols, block_size)) + [cols]
    counts = [int(round(total * b / cols)) - int(round(total * a / cols)) for a, b in zip(edges[:-1], edges[1:])]
    keep = torch.ones_like(W, dtype=torch.bool)
    for k, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        diag1 = torch.diagonal(U1).square()[None, :]
        prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        if pattern.kind != "nm" and counts[k]:
            saliency = (W1.square() / diag1).flatten()
            prune1.view(-1)[torch.topk(saliency, counts[k], largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                j = slice(i, i + pattern.m)
                prune1[:, j] = ~row_topk_mask(W1[:, j].square() / diag1[:, j], 0.0, pattern)
            w = W1[:, i]
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    W[~keep] = 0.0
    if not torch.isfinite(W).all():
        W = weight.float() * keep
        W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
    return W, keep, used_damp


def test_grid_none_is_bit_identical_to_before():
    for seed in range(1):
        W0, _, H = correlated(seed, d=64, out=16)
        H[:, :2] = H[:2, :] = 0
        for pattern, density in (("unstructured", 0.3), ("unstructured", 0.6), ("2:4", 0.5), ("4:8", 0.5)):
            for block in (16, 128):
                want = _reference_sparsegpt(W0, H, density, parse_pattern(pattern), block)
                got = sparsegpt_solve(W0, H, density, parse_pattern(pattern), block)
                assert len(got) == 3 and got[2] == want[2]
                assert torch.equal(bits_of(got[0]), bits_of(want[0])) and torch.equal(got[1], want[1])
                assert torch.equal(bits_of(sparsegpt_solve(W0, H, density, parse_pattern(pattern), block,
                                                           grid=None)[0]), bits_of(want[0]))


# -- the grid on the module, and storing it exactly -----------------------------------------------------------------
def _quantized_linear(pattern="unstructured", bits=8, group=None, seed=0, d=128, out=64):
    W0, _, H = correlated(seed, d=d, out=out)
    layer = nn.Linear(d, out)
    grid = QuantGrid(bits, group)
    W, keep, _, scales = sparsegpt_solve(W0, H, 0.5, parse_pattern(pattern), grid=grid)
    with torch.no_grad():
        layer.weight.copy_(W)
    set_mask(layer, keep)
    set_quant_grid(layer, scales, grid)
    return layer


def test_grid_lives_on_the_module_outside_the_state_dict():
    layer = _quantized_linear(bits=4, group=32)
    assert list(layer.state_dict()) == ["weight", "bias"]
    state = get_quant_grid(layer)
    assert isinstance(state, QuantGridState) and state.grid == QuantGrid(4, 32) and not state.transposed
    assert [item.qualified_name for item in iter_quant_grids(nn.Sequential(layer))] == ["0.weight"]
    with pytest.raises(SparsityError, match="not on the grid"):
        set_quant_grid(nn.Linear(128, 64), state.scales, state.grid)
    with pytest.raises(SparsityError, match="shape"):
        set_quant_grid(layer, state.scales[:, :2], state.grid)
    with pytest.raises(SparsityError, match="finite"):
        set_quant_grid(layer, -state.scales, state.grid)
    with pytest.raises(SparsityError, match="no parameter"):
        set_quant_grid(layer, state.scales, state.grid, name="nope")
    remove_quant_grid(layer)
    assert get_quant_grid(layer) is None


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("bits,group", [(8, None), (8, 64), (4, 32), (4, None)])
def test_save_load_bit_exact_and_smaller(tmp_path, capsys, pattern, bits, group):
    layer = _quantized_linear(pattern, bits, group)
    sizes = {"fp32": os.path.getsize(sparsetorch.save(layer, tmp_path / "fp32.safetensors"))}
    for values in ["grid", "int8"] + (["int4"] if bits == 4 else []):
        path = sparsetorch.save(layer, tmp_path / f"{values}.safetensors", values=values)
        sizes[values] = os.path.getsize(path)
        fresh = nn.Linear(128, 64)
        sparsetorch.load(fresh, path)
        assert torch.equal(bits_of(fresh.weight.detach()), bits_of(layer.weight.detach())), values
        assert torch.equal(fresh.bias, layer.bias) and torch.equal(get_mask(fresh), get_mask(layer))
        state, want = get_quant_grid(fresh), get_quant_grid(layer)
        assert state.grid == want.grid and torch.equal(state.scales, want.scales)
        assert sizes[values] < sizes["fp32"]
        again = sparsetorch.save(fresh, tmp_path / f"{values}2.safetensors", values=values)  # the grid came back
        assert os.path.getsize(again) == sizes[values]
    assert sizes["grid"] <= sizes["int8"]  # 4-bit codes: packed pairs or int8 codes, whichever squeezes smaller
    with capsys.disabled():
        print(f"\n  {pattern} int{bits} group {group}: file bytes {sizes}", end="")


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "csr", "gapmask", "nm"])
@pytest.mark.parametrize("bits", [8, 4])
def test_grid_codes_over_every_format(tmp_path, fmt, bits):
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(64, 9, bias=False)
    keep = torch.rand(9, 64, generator=g) < 0.4 if fmt != "nm" else row_topk_mask(torch.rand(9, 64, generator=g), 0.5,
                                                                                  parse_pattern("2:4"))
    keep[0, 0] = not keep[0, 0] if fmt != "nm" else keep[0, 0]  # an odd number of codes: int4 padding
    W, scales = round_to_nearest(torch.randn(9, 64, generator=g), keep, QuantGrid(bits, 16))
    with torch.no_grad():
        layer.weight.copy_(W)
    set_mask(layer, keep)
    set_quant_grid(layer, scales, QuantGrid(bits, 16))
    path = sparsetorch.save(layer, tmp_path / "m.safetensors", format=fmt, values="grid")
    fresh = nn.Linear(64, 9, bias=False)
    sparsetorch.load(fresh, path)
    assert torch.equal(bits_of(fresh.weight.detach()), bits_of(W)) and torch.equal(get_mask(fresh), keep)


class Conv1D(nn.Module):
    """GPT-2's layer: weight stored [in, out]."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


def test_transposed_weight_grid_round_trips(tmp_path):
    W0, _, H = correlated(4, d=64, out=48)
    W, keep, _, scales = sparsegpt_solve(W0, H, 0.5, parse_pattern("unstructured"), grid=QuantGrid(4, 16))
    layer = Conv1D(64, 48)
    with torch.no_grad():
        layer.weight.copy_(W.t())
    set_mask(layer, keep.t())
    set_quant_grid(layer, scales, QuantGrid(4, 16), transposed=True)
    fresh = sparsetorch.load(Conv1D(64, 48), sparsetorch.save(layer, tmp_path / "t.safetensors", values="int4"))
    assert torch.equal(bits_of(fresh.weight.detach()), bits_of(layer.weight.detach()))
    assert get_quant_grid(fresh).transposed


def test_what_the_grid_codecs_refuse(tmp_path):
    plain = nn.Linear(8, 4)
    with pytest.raises(SparsityError, match="no parameter of the model has one"):
        sparsetorch.save(plain, tmp_path / "x.safetensors", values="grid")
    layer = _quantized_linear(bits=8, group=32)
    with pytest.raises(SparsityError, match="8-bit grid"):
        sparsetorch.save(layer, tmp_path / "x.safetensors", values="int4")
    with torch.no_grad():
        layer.weight[get_mask(layer)] *= 1.001  # e.g. fine-tuned after quantization
    for values in ("grid", "int8"):
        with pytest.raises(SparsityError, match="left its quantization grid"):
            sparsetorch.save(layer, tmp_path / "x.safetensors", values=values)
    assert not (tmp_path / "x.safetensors").exists()
    sparsetorch.save(layer, tmp_path / "ok.safetensors")  # fp32 stores whatever the weights are


def test_loading_a_file_without_grids_drops_stale_ones(tmp_path):
    layer = _quantized_linear(bits=4, group=32)
    path = sparsetorch.save(nn.Linear(128, 64), tmp_path / "plain.safetensors")
    sparsetorch.load(layer, path)
    assert get_quant_grid(layer) is None and get_mask(layer) is None


def test_lossy_int4_rows_without_a_grid(tmp_path):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 33), nn.Linear(33, 5))
    set_mask(layer[0], torch.rand(33, 64) < 0.3)
    path = sparsetorch.save(layer, tmp_path / "q.safetensors", values="int4")
    fresh = nn.Sequential(nn.Linear(64, 33), nn.Linear(33, 5))
    sparsetorch.load(fresh, path)
    w, got = layer[0].weight, fresh[0].weight
    assert (got - w).abs().le(w.abs().amax(1, keepdim=True) / 14 + 1e-7).all()
    assert torch.equal(fresh[0].bias, layer[0].bias) and get_quant_grid(fresh[0]) is None  # vectors exact
    assert torch.equal(get_mask(fresh[0]), get_mask(layer[0]))
    assert os.path.getsize(path) < os.path.getsize(sparsetorch.save(layer, tmp_path / "q8.safetensors", values="int8"))


@pytest.mark.parametrize("method,bits,group", [("sparsegpt", 8, None), ("sparsegpt", 4, 16), ("wanda", 4, None)])
def test_prune_oneshot_bits_puts_kept_weights_on_the_grid_and_saves_exactly(tmp_path, method, bits, group):
    import sparsetorch
    from sparsetorch.core.masks import iter_masks
    from sparsetorch.core.quant_grid import get_quant_grid
    from sparsetorch.oneshot import prune_oneshot
    from sparsetorch.oneshot.conformance import tiny_calibration, tiny_lm

    model = tiny_lm()
    prune_oneshot(model, tiny_calibration(), method=method, sparsity=0.5, bits=bits, group_size=group, progress=False)
    assert model.sparsetorch_stats.bits == bits
    for item in iter_masks(model):
        state = get_quant_grid(item.module)
        assert state is not None and state.grid.bits == bits
        codes, off = grid_codes(item.module.weight.detach(), state.scales, state.grid)
        assert off == 0 and int(codes.abs().max()) <= state.grid.qmax
    path = tmp_path / "m.safetensors"
    sparsetorch.save(model, path, values="grid")
    fresh = tiny_lm(seed=1)
    sparsetorch.load(fresh, path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_bits_needs_float32_and_group_size_needs_bits():
    from sparsetorch.oneshot import prune_oneshot
    from sparsetorch.oneshot.conformance import tiny_calibration, tiny_lm

    with pytest.raises(SparsityError, match="pass bits"):
        prune_oneshot(tiny_lm(), tiny_calibration(), method="wanda", group_size=16)
    with pytest.raises(SparsityError, match="float32"):
        prune_oneshot(tiny_lm().to(torch.bfloat16), tiny_calibration(), method="wanda", bits=8)
    model = tiny_lm()
    model.get_input_embeddings().to(torch.bfloat16)  # neither pruned nor quantized: its dtype does not matter
    prune_oneshot(model, None, method="magnitude", bits=8, progress=False)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16 and model.sparsetorch_stats.layers
