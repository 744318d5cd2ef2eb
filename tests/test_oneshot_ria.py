"""RIA (relative importance and activations) and its N:M channel permutation: the score formula,
the permutation's guarantees, masks kept in the original column order, and the input order
recorded on the module."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetorch.core.masks import get_input_order, get_mask, remove_mask, remove_masks, set_input_order, set_mask
from sparsetorch.core.patterns import is_valid_mask, parse_pattern
from sparsetorch.errors import SparsityError
from sparsetorch.oneshot.ria import nm_channel_permutation, nm_kept_score, ria_mask, ria_scores
from sparsetorch.oneshot.solvers import wanda_mask

NM24 = parse_pattern("2:4")
UNSTRUCTURED = parse_pattern("unstructured")


def correlated(seed: int, out: int = 128, d: int = 256, n: int = 2048, outliers: int = 8, scale: float = 20.0):
    """X = randn(n, d/4) @ randn(d/4, d) + 0.1 randn(n, d), a few input channels scaled up; W ~ randn."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    X[:, torch.randperm(d, generator=g)[:outliers]] *= scale
    return torch.randn(out, d, generator=g), X


def outlier_scores(seed: int, out: int = 64, d: int = 128, outliers: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_sq = torch.rand(d, generator=g) + 0.5
    x_sq[torch.randperm(d, generator=g)[:outliers]] *= 400.0
    return ria_scores(torch.randn(out, d, generator=g), x_sq)


def recon_error(W0: torch.Tensor, keep: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W0 - W0 * keep) @ X.T).square().sum())


# ---- the score ----

def test_ria_scores_hand_computed():
    W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])
    x_sq = torch.tensor([16.0, 1.0, 4.0])  # ||X_j|| = 4, 1, 2
    # row sums of |W|: 3, 4; column sums: 4, 2, 1
    ri = torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 2, 0.0], [3 / 4 + 3 / 4, 0.0, 1 / 4 + 1 / 1]])
    norm = torch.tensor([4.0, 1.0, 2.0])
    for a in (0.5, 0.0, 1.0):
        expected = ri * norm.pow(a)[None, :]
        torch.testing.assert_close(ria_scores(W, x_sq, a=a), expected)
    torch.testing.assert_close(ria_scores(W, x_sq)[1, 2], torch.tensor(1.25 * math.sqrt(2.0)))  # default a = 0.5


def test_ria_scores_zero_rows_and_columns_are_zero_not_nan():
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    s = ria_scores(W, torch.tensor([1.0, 0.0, 4.0]))
    assert torch.isfinite(s).all() and s[0].eq(0).all() and s[:, 1].eq(0).all()
    with pytest.raises(SparsityError):
        ria_scores(W, torch.ones(4))


# ---- the permutation ----

@pytest.mark.parametrize("m,n,block_groups", [(4, 2, None), (8, 4, None), (4, 1, 8), (4, 2, 5)])
def test_permutation_is_a_permutation_and_never_worse(m, n, block_groups):
    for seed in range(3):
        s = outlier_scores(seed)
        perm = nm_channel_permutation(s, m, n=n, block_groups=block_groups)
        assert perm.dtype == torch.int64 and perm.shape == (s.shape[1],)
        assert torch.equal(torch.sort(perm).values, torch.arange(s.shape[1]))
        assert nm_kept_score(s[:, perm], n, m) >= nm_kept_score(s, n, m)


def test_permutation_strictly_helps_with_outlier_channels():
    for seed in range(3):
        s = outlier_scores(seed)
        perm = nm_channel_permutation(s, 4)
        assert nm_kept_score(s[:, perm], 2, 4) > nm_kept_score(s, 2, 4) * 1.001


def test_permutation_returns_identity_when_it_cannot_help():
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])  # 2:4 already keeps every nonzero score
    assert torch.equal(nm_channel_permutation(s, 4), torch.arange(8))
    keep, perm = ria_mask(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.ones(4), 0.5, NM24, permute=True)
    assert perm is None and keep.tolist() == [[True, True, False, False]]


def test_permutation_is_deterministic():
    s = outlier_scores(7)
    assert torch.equal(nm_channel_permutation(s, 4), nm_channel_permutation(s.clone(), 4))
    W, X = correlated(3, out=32, d=64, n=256)
    a, pa = ria_mask(W, X.square().sum(0), 0.5, NM24, permute=True)
    b, pb = ria_mask(W, X.square().sum(0), 0.5, NM24, permute=True)
    assert torch.equal(a, b) and torch.equal(pa, pb)


def test_permutation_rejects_bad_shapes():
    with pytest.raises(SparsityError):
        nm_channel_permutation(torch.rand(4, 10), 4)
    with pytest.raises(SparsityError):
        nm_channel_permutation(torch.rand(4, 8), 4, n=4)


# ---- masks ----

def test_permuted_mask_is_nm_in_permuted_order_and_stored_in_original_order():
    W, X = correlated(0, out=64, d=128, n=512)
    x_sq = X.square().sum(0)
    keep, perm = ria_mask(W, x_sq, 0.5, NM24, permute=True)
    assert perm is not None and keep.shape == W.shape and keep.dtype == torch.bool
    assert is_valid_mask(keep, NM24, input_order=perm)
    assert not is_valid_mask(keep, NM24)  # plain check: not 2:4 in the original column order
    assert int(keep.sum()) == W.numel() // 2
    # it is the N:M mask of the permuted scores, un-permuted
    s = ria_scores(W, x_sq)
    kept_permuted = keep[:, perm]
    assert math.isclose(float(s[:, perm][kept_permuted].double().sum()), nm_kept_score(s[:, perm], 2, 4), rel_tol=1e-9)
    plain, none = ria_mask(W, x_sq, 0.5, NM24)
    assert none is None and is_valid_mask(plain, NM24)
    assert float(s[keep].double().sum()) > float(s[plain].double().sum())


def test_is_valid_mask_input_order_rejects_non_permutations():
    mask = torch.tensor([[True, True, False, False]])
    assert is_valid_mask(mask, NM24, input_order=torch.tensor([0, 2, 1, 3]))
    assert not is_valid_mask(mask, "1:4", input_order=torch.tensor([0, 2, 1, 3]))
    assert not is_valid_mask(mask, NM24, input_order=torch.tensor([0, 0, 1, 3]))  # duplicate
    assert not is_valid_mask(mask, NM24, input_order=torch.tensor([0, 1, 2]))  # wrong length
    assert not is_valid_mask(mask, NM24, input_order=torch.tensor([0.0, 1.0, 2.0, 3.0]))  # not integers


def test_ria_mask_unstructured_rows_and_layer():
    W, X = correlated(1, out=16, d=64, n=128)
    x_sq = X.square().sum(0)
    keep, perm = ria_mask(W, x_sq, 0.25, UNSTRUCTURED, permute=True)  # permute only applies to N:M
    assert perm is None and keep.sum(dim=1).eq(16).all()
    layer, _ = ria_mask(W, x_sq, 0.25, "unstructured", scope="layer")
    assert int(layer.sum()) == W.numel() // 4
    s = ria_scores(W, x_sq)
    assert float(s[layer].min()) >= float(s[~layer].max())
    for bad in ("block:4x4", "channel"):
        with pytest.raises(SparsityError):
            ria_mask(W, x_sq, 0.5, bad)


# ---- the input order on the module ----

def test_input_order_round_trip_not_in_state_dict_removed_with_masks():
    lin = nn.Linear(8, 3)
    order = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    buf = set_input_order(lin, order)
    assert buf.dtype == torch.int64 and torch.equal(get_input_order(lin), order)
    assert set(lin.state_dict()) == {"weight", "bias"}
    set_input_order(lin, torch.arange(8, dtype=torch.int32))  # replace
    assert get_input_order(lin).dtype == torch.int64 and torch.equal(get_input_order(lin), torch.arange(8))
    with pytest.raises(SparsityError):
        set_input_order(lin, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(SparsityError):
        set_input_order(lin, torch.arange(7))
    with pytest.raises(SparsityError):
        set_input_order(lin, torch.arange(8), name="nope")

    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    set_mask(model[0], torch.ones(4, 8, dtype=torch.bool))
    set_input_order(model[0], order)
    set_input_order(model[1], torch.tensor([1, 0, 3, 2]))  # an order without a mask goes too
    remove_masks(model)
    assert all(get_input_order(mod) is None and get_mask(mod) is None for mod in model)
    set_mask(model[2], torch.ones(2, 4, dtype=torch.bool))
    set_input_order(model[2], torch.tensor([1, 0, 3, 2]))
    remove_mask(model[2])
    assert get_input_order(model[2]) is None


def test_pruned_model_computes_the_masked_dense_model():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(10, 64)
    g = torch.Generator().manual_seed(5)
    x_sq = torch.rand(64, generator=g) + 0.1
    x_sq[:4] *= 500.0
    keep, perm = ria_mask(W0, x_sq, 0.5, NM24, permute=True)
    assert perm is not None

    dense = lin(x).detach()
    set_mask(lin, torch.ones_like(keep))  # nothing pruned: an input order alone changes nothing
    set_input_order(lin, perm)
    assert torch.equal(lin(x), dense)

    set_mask(lin, keep)
    set_input_order(lin, perm)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, W0 * keep, b0))
    assert is_valid_mask(get_mask(lin), NM24, input_order=get_input_order(lin))
    remove_masks(lin)
    assert torch.equal(lin.weight, W0 * keep)


# ---- what it buys on synthetic data (numbers printed: pytest -s) ----

def test_permutation_lowers_2_4_reconstruction_error_on_correlated_inputs():
    rows = []
    for seed in range(3):
        W, X = correlated(seed)
        x_sq = X.square().sum(0)
        total = float((W @ X.T).square().sum())
        plain, _ = ria_mask(W, x_sq, 0.5, NM24)
        permuted, perm = ria_mask(W, x_sq, 0.5, NM24, permute=True)
        assert perm is not None and is_valid_mask(permuted, NM24, input_order=perm)
        e_plain, e_perm = recon_error(W, plain, X) / total, recon_error(W, permuted, X) / total
        e_wanda = recon_error(W, wanda_mask(W, x_sq, 0.5, NM24), X) / total
        rows.append((seed, e_plain, e_perm, e_wanda))
        assert e_perm < e_plain
    for seed, e_plain, e_perm, e_wanda in rows:
        print(f"2:4 seed {seed}: relative ||(W0-W)X||^2 RIA {e_plain:.5f}  RIA+perm {e_perm:.5f}  Wanda {e_wanda:.5f}")


def test_ria_vs_wanda_at_half_density_reported():
    for seed in range(3):
        W, X = correlated(seed)
        x_sq = X.square().sum(0)
        total = float((W @ X.T).square().sum())
        ria, _ = ria_mask(W, x_sq, 0.5, UNSTRUCTURED)
        wanda = wanda_mask(W, x_sq, 0.5, UNSTRUCTURED)
        assert int(ria.sum()) == int(wanda.sum()) == W.numel() // 2
        e_ria, e_wanda = recon_error(W, ria, X) / total, recon_error(W, wanda, X) / total
        assert math.isfinite(e_ria) and e_ria < 0.1  # reported, not ranked: synthetic data need not match LLMs
        print(f"50% seed {seed}: relative ||(W0-W)X||^2 RIA {e_ria:.5f}  Wanda {e_wanda:.5f}")


def test_prune_oneshot_ria_permute_records_the_order_and_keeps_outputs():
    from sparsetorch.core.masks import get_input_order, iter_masks
    from sparsetorch.models import MLP
    from sparsetorch.oneshot import prune_oneshot

    torch.manual_seed(0)
    model = MLP((64, 128, 96, 10))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 64, generator=g) * torch.linspace(0.1, 8.0, 64) for _ in range(4)]  # uneven channels
    prune_oneshot(model, calib, method="ria", pattern="2:4", sparsity=None, permute=True, progress=False)
    orders = 0
    for item in iter_masks(model):
        order = get_input_order(item.module)
        if order is not None:
            orders += 1
            assert is_valid_mask(item.mask, "2:4", input_order=order)
        x = torch.randn(5, item.module.in_features)
        expect = torch.nn.functional.linear(x, item.module.weight * item.mask, item.module.bias)
        assert torch.equal(item.module(x), expect)
    assert orders >= 1
    with pytest.raises(SparsityError, match="permute=True"):
        prune_oneshot(MLP((64, 32, 4)), calib, method="wanda", pattern="2:4", sparsity=None, permute=True)
