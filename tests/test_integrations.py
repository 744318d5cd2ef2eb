"""The plain training loop (one extra line per step) and the no-pickle state encoding."""
import pytest
import torch

import sparsetorch
from sparsetorch.errors import SparsityError
from sparsetorch.integrations.training_state import decode_state, encode_state, unwrap_model
from sparsetorch.models import MLP

from ddp_worker import SwapSparsifier


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=1e-2),
                                      lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                                      lambda p: torch.optim.RMSprop(p, lr=1e-2)])
def test_plain_loop_needs_one_line_per_step(make_opt):
    torch.manual_seed(0)
    model = MLP((12, 24, 16, 3))
    optimizer = make_opt(model.parameters())
    sparsifier = SwapSparsifier(sparsity=0.9, every=3, generator=torch.Generator().manual_seed(0))
    sparsifier.attach(model, optimizer)
    g = torch.Generator().manual_seed(1)
    for step in range(9):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()  # the one extra line
        for item in sparsetorch.iter_masks(model):
            assert (item.param[~item.mask] == 0).all(), f"step {step}: a pruned weight of {item.qualified_name} moved"
            for value in optimizer.state[item.param].values():  # no momentum left to revive pruned weights
                if value.shape == item.param.shape:
                    assert (value[~item.mask] == 0).all()
    assert sparsifier.step_count == 9 and [row["step"] for row in sparsifier.history] == [0, 3, 6, 9]
    assert all(row["moved"] > 0 for row in sparsifier.history[1:])
    assert all(row["density"] == pytest.approx(0.1, abs=0.01) for row in sparsifier.history)


def test_state_encoding_round_trips_nested_data():
    state = {"step": 3, 0: {"exp_avg": torch.arange(4.0), "flag": True}, "betas": (0.9, 0.999),
             "rows": [{"moved": 2, "x": None}], "t": "not a tag", "inf": float("inf")}
    tensors = {}
    data = encode_state(state, tensors)
    back = decode_state(data, tensors)
    assert back["betas"] == (0.9, 0.999) and back["rows"] == [{"moved": 2, "x": None}] and back["t"] == "not a tag"
    assert torch.equal(back[0]["exp_avg"], torch.arange(4.0)) and back[0]["flag"] is True and back["step"] == 3
    assert back["inf"] == float("inf")
    with pytest.raises(SparsityError, match="plain data"):
        encode_state({"gen": torch.Generator()}, {})


def test_unwrap_model_sees_through_compile_and_ddp_wrappers():
    model = MLP((4, 4, 2))
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model
