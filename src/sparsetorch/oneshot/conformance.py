"""Conformance checks for one-shot configurations (``sparsetorch.testing.check_oneshot``).

Every score, solver, distribution, refinement and quantization must pass the same checks: the
target sparsity is reached exactly, the pattern is valid, the masks are installed and survive
fine-tuning, the same inputs give bitwise the same model, and bad input leaves the model untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.masks import get_input_order, iter_masks
from ..core.patterns import is_valid_mask, parse_pattern
from ..errors import SparsityError
from ..models.gpt import GPT, GPTConfig
from .api import prune_oneshot
from .specs import parse_spec, uses_data

__all__ = ["check_oneshot", "tiny_lm", "tiny_calibration"]


def tiny_lm(seed: int = 0) -> GPT:
    """A 2-block byte GPT with a few outlier input features, small enough for every check."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(layers=2, width=32, heads=2, context=16)).eval()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.ln1.weight[: 2 + 3 * i] *= 6.0
    return model


def tiny_calibration(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


def _view(item) -> torch.Tensor:
    return item.mask.t() if type(item.module).__name__ == "Conv1D" else item.mask  # [out, in]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_exact_sparsity(model: nn.Module, pattern: str) -> None:
    pat = parse_pattern(pattern)
    stats = model.sparsetorch_stats
    targets = {r.name: r.target for r in stats.layers}
    masks = list(iter_masks(model))
    assert masks, "no mask was installed"
    for item in masks:
        view = _view(item)
        if pat.kind == "nm":
            order = get_input_order(item.module)
            assert is_valid_mask(view, pat, **({"input_order": order} if order is not None else {})), \
                f"{item.fqn}: mask is not a valid {pat} mask"
            assert (view.sum() * pat.m == pat.n * view.numel()), f"{item.fqn}: not exactly {pat.n} of {pat.m} kept"
        else:
            want = round(targets[item.fqn] * view.numel())
            got = int((~view).sum())
            assert got == want, f"{item.fqn}: {got} weights pruned, its target says {want}"
        assert torch.all(item.module.weight.detach()[~item.mask] == 0), f"{item.fqn}: pruned weights are not zero"


def check_kept_by_fine_tuning(model: nn.Module, steps: int = 3) -> None:
    masks = {m.fqn: m.mask.clone() for m in iter_masks(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(99)
    for _ in range(steps):
        loss = model.loss(torch.randint(0, 256, (2, 17), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for item in iter_masks(model):
        assert torch.equal(item.mask, masks[item.fqn]), f"{item.fqn}: the mask changed during fine-tuning"
        assert torch.all(item.module.weight.detach()[~item.mask] == 0), f"{item.fqn}: a pruned weight revived"


def check_untouched_on_bad_input(kwargs: dict, sparsity, pattern: str, needs_data: bool) -> None:
    model = tiny_lm()
    before = _state(model)
    bad = tiny_calibration()[:2] + [torch.full((1, 16), 999)]  # token ids outside the vocabulary
    try:
        prune_oneshot(model, bad, sparsity=sparsity, pattern=pattern, progress=False, **kwargs)
    except SparsityError:
        pass
    else:
        if needs_data:
            raise AssertionError("out-of-vocabulary calibration ids were accepted")
        return  # magnitude alone never reads the calibration data
    assert not list(iter_masks(model)), "a mask was installed although the call failed"
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed although the call failed"


def check_oneshot(spec: str, *, sparsity: float | None = 0.6, pattern: str = "unstructured") -> None:
    """Run every one-shot conformance check on ``spec`` (e.g. "wanda+owl+dsnot")."""
    kwargs, _ = parse_spec(spec)
    if pattern != "unstructured":
        sparsity = None
    runs = []
    for _ in range(2):
        model = tiny_lm()
        prune_oneshot(model, tiny_calibration(), sparsity=sparsity, pattern=pattern, progress=False, **kwargs)
        runs.append(model)
    check_exact_sparsity(runs[0], pattern)
    a, b = _state(runs[0]), _state(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a), f"{spec}: two runs on the same inputs differ"
    masks_b = {m.fqn: m.mask for m in iter_masks(runs[1])}
    assert all(torch.equal(m.mask, masks_b[m.fqn]) for m in iter_masks(runs[0])), f"{spec}: masks differ between runs"
    check_kept_by_fine_tuning(runs[0])  # not a deepcopy: a copy's parameters carry no mask hooks
    check_untouched_on_bad_input(kwargs, sparsity, pattern, uses_data(spec))
