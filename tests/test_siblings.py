"""Linears fed the same input run as one kernel call (inference/siblings.py)."""
import pytest
import torch

import sparsetorch
from sparsetorch.kernels import has_extension
from sparsetorch.kernels.bitmask_weight import BitmaskWeight
from sparsetorch.inference import convert, sibling_choice
from sparsetorch.inference import siblings as siblings_module
from sparsetorch.inference.sibling_choice import Sibling
from sparsetorch.inference.siblings import SiblingLinear, concatenable

pytestmark = pytest.mark.skipif(not has_extension(), reason="compiled kernels not built")


def _weight(out, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    return w * (torch.rand(out, n, generator=g) > 0.7)


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_concat_and_rows_round_trip(values):
    parts = [BitmaskWeight.from_dense(_weight(out, 96, out), values) for out in (5, 16, 3)]
    whole = BitmaskWeight.concat(parts)
    assert torch.equal(whole.to_dense(), torch.cat([p.to_dense() for p in parts]))
    bounds = [0, 5, 21, 24]
    for p, a, b in zip(parts, bounds, bounds[1:]):
        view = whole.rows(a, b)
        assert torch.equal(view.to_dense(), p.to_dense())
        assert view.values.data_ptr() == whole.values[int(whole.row_start[a]):].data_ptr()  # a view, not a copy
        x = torch.randn(2, 96)
        assert torch.allclose(view.linear(x), p.linear(x), rtol=1e-5, atol=1e-5)


def test_concat_rejects_mismatched_parts():
    with pytest.raises(sparsetorch.SparsityError, match="same inputs"):
        BitmaskWeight.concat([BitmaskWeight.from_dense(_weight(4, 32, 0)), BitmaskWeight.from_dense(_weight(4, 48, 1))])
    with pytest.raises(sparsetorch.SparsityError, match="same inputs"):
        BitmaskWeight.concat([BitmaskWeight.from_dense(_weight(4, 32, 0)),
                              BitmaskWeight.from_dense(_weight(4, 32, 1), "int8")])


def test_decoder_projections_share_one_call(pruned_llama, unfused):
    model = pruned_llama(hidden=128, intermediate=256, bias=True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    fused = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="int8")
    groups = [row["members"] for row in fused.sparsetorch_plan if row["type"] == "SiblingLinear"]
    assert [m.rpartition(".")[2] for m in groups[0]] == ["q_proj", "k_proj", "v_proj"]  # biases included
    assert [m.rpartition(".")[2] for m in groups[1]] == ["gate_proj", "up_proj"]
    assert len(groups) == 4
    apart = unfused(fused)
    with torch.no_grad():
        # the same rows on the same kernels: the same numbers, prompt and decode
        assert torch.equal(fused(ids).logits, apart(ids).logits)
        assert torch.equal(fused.generate(ids, max_new_tokens=6, do_sample=False),
                           apart.generate(ids, max_new_tokens=6, do_sample=False))
        # a sibling called alone (another input) runs its own rows of the combined weight
        attn, ref_attn = fused.model.layers[1].self_attn, apart.model.layers[1].self_attn
        x = torch.randn(3, 128)
        assert torch.equal(attn.k_proj(x), ref_attn.k_proj(x))
        assert torch.equal(attn.v_proj(x), ref_attn.v_proj(x))
        assert attn.k_proj._group._input is x  # q_proj's rows wait for it
        assert torch.equal(attn.q_proj(x), ref_attn.q_proj(x))
        assert attn.k_proj._group._input is None  # every sibling served: the input is let go
    with torch.inference_mode():  # tensors without version counters
        assert torch.equal(fused(ids).logits, apart(ids).logits)


def test_unfused_conversion_keeps_siblings_apart(pruned_llama):
    model = pruned_llama(hidden=128, intermediate=256, bias=True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    apart = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="int8", fuse=False)
    assert not any(isinstance(m, SiblingLinear) for m in apart.modules())
    assert not any("siblings_ms" in row for row in apart.sparsetorch_plan)


@pytest.mark.parametrize("faster", ["shared", "apart"])
def test_siblings_that_chose_different_layouts_share_one_where_faster(faster, monkeypatch):
    """q_proj alone on the dense int8 layout, k_proj on the bitmask one: timed as one call on a layout both
    offer against the two calls apart, the faster is kept (timings rigged to pick each)."""
    ws = [_weight(32, 64, 1), _weight(32, 64, 2)]
    layouts = {"q": "dense-int8", "k": "bitmask-int8"}
    cands = {n: convert._lossy_candidates(w, None, "int8") for n, w in zip("qk", ws)}
    siblings = [Sibling(n, cands[n][layouts[n]](), {k: b() for k, b in cands[n].items()}, ("key", n, faster))
                for n in "qk"]
    assert not BitmaskWeight.concatenable([s.chosen.packed for s in siblings])

    def rigged(fns, budget_s, cuda, cold=False):
        assert "apart" in fns and "bitmask-int8" in fns and "dense-int8" in fns
        return {k: (1.0 if k == "apart" else 2.0 if k != "bitmask-int8" else 0.5 if faster == "shared" else 3.0)
                for k in fns}
    monkeypatch.setattr(sibling_choice, "time_candidates", rigged)
    x = torch.randn(1, 64)
    layout, layers, times = sibling_choice.shared_layout(siblings, x, 0.01, False)
    assert set(times) >= {"apart", "bitmask-int8"}
    if faster == "apart":
        assert layout is None and layers == {}
        return
    assert layout == "bitmask-int8" and BitmaskWeight.concatenable([layers[n].packed for n in "qk"])
    for n, w in zip("qk", ws):  # each sibling's own weight, in the shared layout
        assert torch.allclose(layers[n](x), siblings["qk".index(n)].options["bitmask-int8"](x))


def test_siblings_go_back_to_their_own_layouts_when_the_shared_call_is_refused(pruned_llama, monkeypatch):
    """Siblings moved to a common layout for one call, which fuse_siblings then does not make (the combined
    model did not reproduce the output: rigged here), run again on the layouts they chose alone."""
    own, kernel_alone = {}, {}
    share_layout = convert._share_layout

    def spy(inf, siblings, plan, *args):  # what each sibling chose alone, by the plan
        rows = {row["layer"]: row for row in plan}
        kernel_alone.update({s.name: rows[s.name]["kernel"] for s in siblings})
        return share_layout(inf, siblings, plan, *args)

    def moved(siblings, x, budget_s, cold):  # each group moved to a layout all offer and none chose alone
        common = [n for n in siblings[0].options if all(n in s.options for s in siblings)
                  and concatenable([s.options[n] for s in siblings])
                  and all(kernel_alone[s.name] != n for s in siblings)]
        if not common:
            return None, {}, {}
        own.update({s.name: s.chosen for s in siblings})
        return common[0], {s.name: s.options[common[0]] for s in siblings}, {common[0]: 1.0, "apart": 2.0}
    monkeypatch.setattr(convert, "_share_layout", spy)
    monkeypatch.setattr(convert, "shared_layout", moved)
    monkeypatch.setattr(siblings_module, "max_error", lambda out, ref: "rigged mismatch")
    model = pruned_llama(hidden=128, intermediate=256)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(sparsetorch.SparsityWarning, match="rigged mismatch"):
        fast = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="int8")
    assert own and not any(isinstance(m, SiblingLinear) for m in fast.modules())
    rows = {row["layer"]: row for row in fast.sparsetorch_plan}
    for name, layer in own.items():
        assert fast.get_submodule(name) is layer
        assert rows[name]["kernel"] == kernel_alone[name]


def test_combined_model_compiles(pruned_llama):
    model = pruned_llama(hidden=128, intermediate=256, bias=True)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    fast = sparsetorch.to_inference(model, (ids,), budget_s=0.02, values="int8")
    with torch.no_grad():
        ref = fast.generate(ids, max_new_tokens=4, do_sample=False)
        torch._dynamo.reset()
        out = sparsetorch.inference.compile_decode(fast).generate(ids, max_new_tokens=4, do_sample=False)
    torch._dynamo.reset()
    assert torch.equal(out, ref)
