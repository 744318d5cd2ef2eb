"""OWL's layer-wise densities and padding-aware calibration statistics."""
import pytest
import torch

from sparsetorch import SparsityError
from sparsetorch.core.masks import get_mask, iter_masks
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.oneshot import OWL, outlier_ratio, owl_densities, prune_oneshot


def test_owl_densities_mean_is_target_and_spread_is_two_lambda():
    ratios, sizes = [0.01, 0.05, 0.02, 0.09], [100, 100, 300, 100]
    d = owl_densities(ratios, sizes, target=0.3, lam=0.08)
    mean = sum(x * s for x, s in zip(d, sizes)) / sum(sizes)
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert max(d) - min(d) == pytest.approx(0.16, abs=1e-12)
    assert d.index(max(d)) == 3 and d.index(min(d)) == 0  # more outliers, more weights kept


def test_owl_equal_ratios_is_uniform_and_clipping_keeps_the_mean():
    assert owl_densities([0.1, 0.1], [5, 5], 0.4, 0.08) == [0.4, 0.4]
    d = owl_densities([0.0, 1.0, 1.0], [10, 10, 10], target=0.05, lam=0.2)
    assert min(d) >= 0 and sum(d) / 3 == pytest.approx(0.05, abs=1e-9)


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = [torch.tensor([1.0] * 98 + [100.0, 100.0])]  # mean 2.98: two entries above 5 x mean
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.02)


def test_owl_settings_are_validated():
    with pytest.raises(SparsityError, match="lambda"):
        OWL(lam=0.7)
    with pytest.raises(SparsityError, match="threshold"):
        OWL(m=0)


def _gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(layers=3, width=64, heads=4, context=32)).eval()
    with torch.no_grad():  # a few outlier input features, unevenly per block, as trained LMs have
        for i, block in enumerate(model.blocks):
            block.ln1.weight[: 2 + 4 * i] *= 8.0
    return model


def _calib(n=4, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_varies_block_sparsity_around_the_target(method):
    model = _gpt()
    prune_oneshot(model, _calib(), method=method, sparsity=0.6, distribution="owl", progress=False)
    stats = model.sparsetorch_stats
    assert stats.distribution == "owl" and len(stats.outlier_ratios) == 3
    assert stats.sparsity == pytest.approx(0.6, abs=2e-3)
    per_block = {}
    for r in stats.layers:
        per_block.setdefault(r.name.split(".")[1], set()).add(round(r.target, 9))
    targets = [t for ts in per_block.values() for t in ts]
    assert all(len(ts) == 1 for ts in per_block.values())  # one sparsity per block
    assert max(targets) - min(targets) == pytest.approx(0.16, abs=1e-6)
    for item in iter_masks(model):
        layer = next(r for r in stats.layers if r.name == item.fqn)
        assert (~item.mask).sum().item() == round(layer.target * item.mask.numel())


def test_owl_rejects_nm_and_dict_sparsity():
    with pytest.raises(SparsityError, match="unstructured"):
        prune_oneshot(_gpt(), _calib(), method="wanda", pattern="2:4", sparsity=None, distribution="owl")
    with pytest.raises(SparsityError, match="one number"):
        prune_oneshot(_gpt(), _calib(), method="wanda", sparsity={"*": 0.5}, distribution="owl")
    with pytest.raises(SparsityError, match="unknown distribution"):
        prune_oneshot(_gpt(), _calib(), method="wanda", distribution="erk")


transformers = pytest.importorskip("transformers")


def _hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padded_positions_never_enter_the_statistics(method):
    """Right padding leaves a causal model's real tokens unchanged, so masks must equal the unpadded run's."""
    g = torch.Generator().manual_seed(3)
    lengths = [9, 14, 20, 6]
    ids = [torch.randint(0, 256, (1, n), generator=g) for n in lengths]
    plain = [{"input_ids": x} for x in ids]
    padded = []
    for x in ids:
        pad = 24 - x.shape[1]
        padded.append({"input_ids": torch.cat([x, torch.zeros(1, pad, dtype=torch.long)], 1),
                       "attention_mask": torch.cat([torch.ones(1, x.shape[1]), torch.zeros(1, pad)], 1).long()})
    a, b = _hf_gpt2(), _hf_gpt2()
    prune_oneshot(a, plain, method=method, sparsity=0.5, progress=False)
    prune_oneshot(b, padded, method=method, sparsity=0.5, progress=False)
    masks_a = {m.fqn: m.mask for m in iter_masks(a)}
    for item in iter_masks(b):
        if method == "wanda":
            assert torch.equal(item.mask, masks_a[item.fqn]), item.fqn
        else:  # padding changes the float order of the real tokens' activations (attention over 24 positions, not
            # n): on AVX2 torch that moved a near-tied weight of SparseGPT's sequential updates; a padded token
            # counted in the Hessian would move many
            agree = (item.mask == masks_a[item.fqn]).float().mean()
            assert agree >= 0.995, (item.fqn, float(agree))
    assert get_mask(b.transformer.h[0].attn.c_attn) is not None


def test_bad_attention_mask_is_rejected_before_pruning():
    model = _hf_gpt2()
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(SparsityError, match="attention_mask has shape"):
        prune_oneshot(model, [{"input_ids": ids, "attention_mask": torch.ones(1, 7)}], method="wanda")
    with pytest.raises(SparsityError, match="0/1"):
        prune_oneshot(model, [{"input_ids": ids, "attention_mask": torch.full((1, 8), 2)}], method="wanda")
    assert not list(iter_masks(model))
