"""Packed weights moved into one huge-page arena (kernels/huge_pages.py, inference/arena.py)."""
import copy

import pytest
import torch

import sparsetorch
from sparsetorch.inference import use_huge_pages
from sparsetorch.inference.siblings import SiblingLinear
from sparsetorch.kernels import has_extension, huge_pages
from sparsetorch.kernels.huge_pages import HUGE_PAGE, move_to_huge_pages


def test_copies_keep_values_layout_and_shared_storage(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setenv("SPARSETORCH_HUGE_PAGES", "1")
    whole = torch.randn(300_000)
    view = whole[10:1000].view(10, 99)  # shares whole's storage at an offset
    codes = torch.randint(-127, 127, (5, 7001), dtype=torch.int8)
    strided = torch.randn(64, 48).t()  # not contiguous
    moved = move_to_huge_pages([whole, view, codes, strided, None])
    if not huge_pages.available():
        assert moved is None
        return
    for t in (whole, view, codes, strided):
        new = moved[id(t)]
        assert torch.equal(new, t) and new.dtype == t.dtype and new.shape == t.shape and new.stride() == t.stride()
        assert new.data_ptr() != t.data_ptr() and new.data_ptr() % huge_pages.ALIGN == 0 or t is view
    assert moved[id(view)].untyped_storage().data_ptr() == moved[id(whole)].untyped_storage().data_ptr()
    assert moved[id(view)].data_ptr() - moved[id(whole)].data_ptr() == view.data_ptr() - whole.data_ptr()
    assert min(m.data_ptr() for m in moved.values()) % HUGE_PAGE == 0  # the arena starts on a huge page
    new = moved[id(whole)]
    del moved
    torch.zeros(1 << 20)  # the arena outlives the dict: its tensors keep the mapping
    assert torch.equal(new, whole)


def test_small_or_switched_off_stays_where_it_is(monkeypatch):
    assert move_to_huge_pages([torch.randn(1000)]) is None  # under MIN_BYTES: one padding page would cost more
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setenv("SPARSETORCH_HUGE_PAGES", "0")
    assert move_to_huge_pages([torch.randn(1000)]) is None


@pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")
def test_converted_model_keeps_its_outputs_and_sibling_views(pruned_llama, monkeypatch):
    monkeypatch.setenv("SPARSETORCH_HUGE_PAGES", "0")  # converted in ordinary memory first
    model = pruned_llama(hidden=128, intermediate=256, bias=True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    fast = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="int8")
    with torch.no_grad():
        before, tokens = fast(ids).logits, fast.generate(ids, max_new_tokens=5, do_sample=False)
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    monkeypatch.setenv("SPARSETORCH_HUGE_PAGES", "1")
    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    moved = use_huge_pages(fast)
    assert (moved > 0) == huge_pages.available()
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, before)
        assert torch.equal(fast.generate(ids, max_new_tokens=5, do_sample=False), tokens)
    after = fast.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    siblings = [m for m in fast.modules() if isinstance(m, SiblingLinear)]
    assert siblings
    for m in siblings:  # each layer's own rows are still views of its group's combined weight
        fused = m._group.fused.packed.values.untyped_storage().data_ptr()
        assert m.layer.packed.values.untyped_storage().data_ptr() == fused
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(fast)(ids).logits, before)
