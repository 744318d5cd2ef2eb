"""What each method does beyond conformance: schedules followed, what grows, rewinding, saliency."""
import pytest
import torch

import sparsetorch
from sparsetorch.core import schedules
from sparsetorch.errors import SparsityError
from sparsetorch.models import MLP, SmallCNN
from sparsetorch.core.patterns import as_2d, is_valid_mask
from sparsetorch.sparsifiers import GMP, SET, SNIP, LotteryTicket, RigL, SRigL, Static, SynFlow, lottery_ticket
from sparsetorch.sparsifiers.at_init import synflow_masks



def masks_of(model):
    return [m.mask.clone() for m in sparsetorch.iter_masks(model)]


def test_gmp_follows_cubic_schedule(setup, train):
    model, optimizer, sp = setup("gmp", start=2, end=14, every=4, sparsity=0.8)
    seen = []
    train(model, optimizer, sp, 16, check=lambda step: seen.append(sp.density()))
    for step, density in enumerate(seen, start=1):
        expected = 1 - (sp.target_sparsity(step - (step - 2) % 4) if step >= 2 else 0.0)
        if step >= 14:
            expected = 0.2
        assert density == pytest.approx(expected, abs=3 / 2048), step


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("block:4x4", 0.75), ("channel", 0.5)])
def test_gmp_patterns(pattern, sparsity, setup, train):
    model, optimizer, sp = setup("gmp", pattern=pattern, sparsity=sparsity, end=8, every=2, scope="layer")
    densities = []
    train(model, optimizer, sp, 10, check=lambda step: densities.append(sp.density()))
    assert all(b <= a for a, b in zip(densities, densities[1:]))
    target = {"2:4": 0.5, "block:4x4": 0.25, "channel": 0.5}[pattern]
    assert sp.density() == pytest.approx(target, abs=0.02)
    for item in sparsetorch.iter_masks(model):
        assert is_valid_mask(item.mask, pattern)


@pytest.mark.parametrize("name", ["set", "rigl", "srigl"])
def test_dst_density_constant_and_grown_start_at_zero(name, setup, train):
    model, optimizer, sp = setup(name, every=3, drop_fraction=0.5, end=100, decay="constant")
    kept = [int(m.sum()) for m in masks_of(model)]
    before = {}

    def check(step):
        assert [int(m.sum()) for m in masks_of(model)] == kept  # exactly k dropped, k grown, per layer
        now = masks_of(model)
        if (step + 1) % 3 == 0:
            for t, old, new in zip(sp.targets, before["masks"], now):
                grown = new & ~old
                assert grown.any()
                assert torch.count_nonzero(t.param[grown]) == 0
                for v in optimizer.state[t.param].values():
                    if isinstance(v, torch.Tensor) and v.shape == grown.shape:
                        assert torch.count_nonzero(v[grown]) == 0
        before["masks"] = now

    before["masks"] = masks_of(model)
    train(model, optimizer, sp, 9, check)


def test_rigl_grows_largest_dense_gradient_captured_only_on_update_steps(batch):
    torch.manual_seed(0)
    model = MLP((16, 48, 32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights frozen: gradients are reproducible
    sp = RigL(sparsity=0.9, every=3, drop_fraction=0.3, end=100, decay="constant").attach(model, optimizer)
    for step in range(3):
        x, y = batch(0)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step < 2:  # the backward before a non-update step captures nothing
            assert sp._dense == {}
            optimizer.step(); optimizer.zero_grad(); sp.step()
    # the dense gradient computed independently, with the masks lifted, before the update
    dense = [_dense_grad(model, t, x, y).abs() for t in sp.targets]
    old = masks_of(model)
    optimizer.step(); optimizer.zero_grad(); sp.step()
    assert sp._dense == {}
    for g, before, after in zip(dense, old, masks_of(model)):
        grown, left_out = after & ~before, ~after & ~before
        assert grown.sum() > 0
        # every grown connection has a larger |gradient| than every inactive one left out
        assert g[grown].min() >= g[left_out].max() - 1e-7


def _dense_grad(model, target, x, y):
    """d loss / d weight with the mask lifted (pruned weights are zero, so the forward is the same)."""
    w = target.param.detach().clone().requires_grad_(True)
    saved = target.module._parameters["weight"]
    target.module._parameters["weight"] = w
    hooks_off = target.module._buffers.pop("weight_mask")
    try:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, [w])
    finally:
        target.module._parameters["weight"] = saved
        target.module._buffers["weight_mask"] = hooks_off
    return g


def _srigl_steps(sp, model, optimizer, steps, check=lambda: None):
    for _ in range(steps):
        x = torch.randn(8, 64)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
        optimizer.step(); optimizer.zero_grad(); sp.step()
        check()


def test_srigl_without_ablation_keeps_constant_fan_in():
    torch.manual_seed(0)
    model = SmallCNN(8)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    sp = SRigL(sparsity=0.9, every=2, drop_fraction=0.5, end=100, ablation=0.0).attach(model, optimizer)

    def check():
        for item in sparsetorch.iter_masks(model):
            fan_in = as_2d(item.mask).sum(dim=1)
            assert (fan_in == fan_in[0]).all() and fan_in[0] >= 1

    _srigl_steps(sp, model, optimizer, 6, check)
    assert sum(r["grown"] for r in sp.history[1:]) > 0


def test_srigl_ablation_moves_inputs_to_live_units_at_constant_total():
    torch.manual_seed(0)
    model = MLP((64, 128, 128, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    sp = SRigL(sparsity=0.95, every=2, drop_fraction=0.5, end=100).attach(model, optimizer)
    total = sum(int(item.mask.sum()) for item in sparsetorch.iter_masks(model))

    def check():
        assert sum(int(item.mask.sum()) for item in sparsetorch.iter_masks(model)) == total
        for item in sparsetorch.iter_masks(model):
            fan_in = as_2d(item.mask).sum(dim=1)
            live = fan_in[fan_in > 0]
            assert int(live.max() - live.min()) <= 1  # constant fan-in, up to the remainder

    _srigl_steps(sp, model, optimizer, 12, check)
    live_rows = [int((as_2d(item.mask).sum(dim=1) > 0).sum()) for item in sparsetorch.iter_masks(model)]
    assert min(live_rows) < 128  # some units were ablated on random labels


def test_srigl_ablates_the_unit_without_salient_weights():
    sp = SRigL(sparsity=0.5, ablation=0.3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    weight = torch.tensor([[1.0, 2.0, 0, 0], [3.0, 4.0, 0, 0], [1e-4, 1e-4, 1e-4, 1e-4]]) * mask
    grad = torch.tensor([[0, 0, 5.0, 6.0], [0, 0, 7.0, 8.0], [0.0, 0.0, 0.0, 0.0]])
    new = sp.drop_and_grow(weight, mask, grad, fraction=0.5)
    assert int(new.sum()) == 6 and not new[2].any()  # unit 2 gone, its two inputs went to the others
    assert new[:2].sum(dim=1).tolist() == [3, 3]
    with pytest.raises(SparsityError, match="ablation"):
        SRigL(ablation=1.0)


def test_set_fraction_decays_and_stops():
    sp = SET(sparsity=0.9, every=10, drop_fraction=0.4, end=100)
    assert sp.fraction(0) == pytest.approx(0.4)
    assert sp.fraction(50) == pytest.approx(0.2)
    assert sp.is_update_step(90) and not sp.is_update_step(100) and not sp.is_update_step(95)


def test_static_reinit_scales_by_kept_fan_in():
    torch.manual_seed(0)
    a = MLP((64, 256, 256, 10))
    b = MLP((64, 256, 256, 10))
    b.load_state_dict(a.state_dict())
    Static(sparsity=0.9, distribution="uniform").attach(a)
    Static(sparsity=0.9, distribution="uniform", reinit=True).attach(b)
    for name in ("fc1", "fc2"):
        wa, wb = getattr(a, name).weight, getattr(b, name).weight
        ratio = float(wb.detach().std() / wa.detach().std())
        assert ratio == pytest.approx(10 ** 0.5, rel=0.15)  # sqrt(fan_in / kept fan_in)
        assert torch.equal(wa != 0, wb != 0)


def test_lottery_ticket_rewinds_survivors_to_init(train):
    torch.manual_seed(0)
    model = MLP((16, 48, 32, 4))
    init = {k: v.clone() for k, v in model.state_dict().items()}

    rounds_seen = []

    def train_fn(model, optimizer, ticket):
        # each round starts from the initial weights, pruned ones at zero
        for name, value in model.state_dict().items():
            mask = getattr(model, name.split(".")[0])._buffers.get("weight_mask") if name.endswith("weight") else None
            expected = init[name] if mask is None else init[name] * mask
            assert torch.equal(value, expected), (ticket.round, name)
        rounds_seen.append(ticket.density())
        train(model, optimizer, ticket, 5)

    ticket = lottery_ticket(model, train_fn, rounds=2, sparsity=0.75, rewind_step=0,
                            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert rounds_seen == pytest.approx([1.0, 0.5, 0.25], abs=3 / 2048)
    assert ticket.round == 2 and ticket.density() == pytest.approx(0.25, abs=3 / 2048)
    assert [r["sparsity"] for r in ticket.history[1:]] == pytest.approx([0.5, 0.75])
    with pytest.raises(sparsetorch.SparsityError, match="rounds are done"):
        ticket.next_round()


def test_lottery_ticket_rewinds_to_early_step(batch, setup):
    model, optimizer, ticket = setup("lottery", opt="sgd", rewind_step=3, rounds=1, sparsity=0.5)
    snapshots = {}

    def check(step):
        snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}

    for step in range(8):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad(); ticket.step()
        check(step)
    ticket.next_round()
    assert ticket.step_count == 3
    for t in ticket.targets:
        mask = sparsetorch.get_mask(t.module, t.name)
        rewound = snapshots[3][f"{t.fqn}.weight"]
        assert torch.equal(t.param[mask], rewound[mask])
        assert not torch.equal(t.param[mask], snapshots[8][f"{t.fqn}.weight"][mask])
    assert torch.equal(model.classifier.weight, snapshots[3]["classifier.weight"])


def test_lottery_ticket_needs_rewind_point(setup):
    model, optimizer, ticket = setup("lottery", rewind_step=50)
    with pytest.raises(sparsetorch.SparsityError, match="rewind point"):
        ticket.next_round()


def test_synflow_is_data_free_leaves_model_alone_and_avoids_collapse():
    torch.manual_seed(0)
    model = MLP((64, 256, 256, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = synflow_masks(model, 0.99, torch.zeros(1, 64), rounds=20)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert list(sparsetorch.iter_masks(model)) == []
    kept = sum(int(m.sum()) for m in masks)
    assert kept == round(0.01 * sum(m.numel() for m in masks))
    for m in masks:  # every layer keeps a path: no unit layer is cut off entirely
        assert m.any(dim=1).sum() > 0 and m.any(dim=0).sum() > 0
    sp = SynFlow(sparsity=0.99, example_inputs=torch.zeros(1, 64), rounds=20).attach(model)
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_of(model)))


def test_snip_prefers_salient_inputs():
    # digits-like data where only the first 8 inputs carry the label: SNIP keeps fc1's weights on them
    torch.manual_seed(0)
    model = MLP((32, 64, 4))
    x = torch.randn(256, 32) * 0.01
    y = torch.randint(0, 4, (256,))
    x[:, :8] += torch.nn.functional.one_hot(y, 4).repeat(1, 2).float() * 3
    SNIP(sparsity=0.9, batch=(x, y)).attach(model)
    per_input = model.fc1.weight_mask.sum(dim=0).float()
    assert per_input[:8].mean() > 3 * per_input[8:].mean()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gmp", "set", "rigl", "srigl", "static"])
def test_methods_on_cuda(name, batch, build):

    torch.manual_seed(0)
    model = MLP((16, 48, 32, 4)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = build(name).attach(model, optimizer)
    for step in range(12):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        optimizer.step(); optimizer.zero_grad(); sp.step()
    assert sp.density() == pytest.approx(0.1, abs=0.02)
    for item in sparsetorch.iter_masks(model):
        assert item.mask.is_cuda and torch.count_nonzero(item.param[~item.mask]) == 0


def test_dropgrow_core_functions():
    from sparsetorch.core.dropgrow import ablate_units, drop_and_grow_flat, split_evenly, top_per_row

    mask = torch.tensor([True, True, True, True, False, False, False, False])
    mag = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    grow = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.9, 0.5, 0.2])
    new = drop_and_grow_flat(mask, mag, grow, 0.5)  # k = 2: drop |w| 1 and 2, grow scores 0.9 and 0.5
    assert new.tolist() == [True, False, True, False, False, True, True, False]
    assert int(new.sum()) == int(mask.sum())
    live = torch.tensor([True, False, True, True])
    assert split_evenly(7, live, 5).tolist() == [3, 0, 2, 2]
    assert top_per_row(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2])).tolist() == [[False, True, True]]
    ablate = ablate_units(torch.tensor([0, 5, 1]), torch.tensor([4, 5, 4]), torch.tensor([True, True, True]), 0.3)
    assert ablate.tolist() == [True, False, True]
    everyone = ablate_units(torch.tensor([0, 1]), torch.tensor([9, 9]), torch.tensor([True, True]), 0.5)
    assert everyone.tolist() == [True, False]  # never every unit: the most salient one stays
