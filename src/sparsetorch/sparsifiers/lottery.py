"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

Train, prune the smallest surviving weights globally, reset the survivors to their values at
``rewind_step`` (0: the initialisation), train again; repeat for ``rounds`` rounds. Each round
removes the same fraction of what is left (``schedules.exponential``), so after the last round
the sparsity is exactly ``sparsity``. Rewinding to an early step rather than to step 0 is what
makes tickets exist in larger networks (Frankle et al. 2020, "Linear mode connectivity").
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core import schedules
from ..errors import SparsityError
from ..core.post_training import compute_masks
from ..core.distributed import is_sharded
from .base import Sparsifier
from .common import check_choice, check_target_sparsity, moves

__all__ = ["LotteryTicket", "lottery_ticket"]


class LotteryTicket(Sparsifier):
    """Holds the rewind point and prunes-and-rewinds on ``next_round()``.

    Args:
        sparsity: sparsity after the last round.
        rounds: number of prune-and-rewind rounds.
        rewind_step: the step whose weights and optimizer state survivors are reset to
            (0: the weights at attach time, the original lottery ticket).
        scope: "global" (the papers) or "layer" magnitude ranking.

    ``step()`` after every optimizer step (it snapshots the rewind point); ``next_round()``
    after each round's training. ``lottery_ticket(...)`` runs the whole procedure.
    """

    def __init__(self, sparsity: float = 0.9, *, rounds: int = 3, rewind_step: int = 0, scope: str = "global",
                 pattern: str = "unstructured", **kwargs: Any):
        super().__init__(**kwargs)
        self.sparsity = check_target_sparsity(sparsity)
        self.rounds = schedules.check_every(rounds, "rounds")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise SparsityError(f"rewind_step must be a step number >= 0, got {rewind_step!r}")
        self.rewind_step = rewind_step
        self.scope = check_choice(scope, ("global", "layer"), "scope")
        self.pattern = pattern
        self.round = 0
        self.rewind: dict[str, Any] | None = None  # {"model": state_dict, "optimizer": state_dict}

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "LotteryTicket":
        if any(is_sharded(p) for p in model.parameters()):
            raise SparsityError("LotteryTicket snapshots and rewinds whole state dicts, which FSDP2 (fully_shard) "
                                "shards; find the ticket on one process or under DDP")
        super().attach(model, optimizer)
        if self.rewind_step == 0:
            self._snapshot()
        return self

    def update(self, step: int) -> None:
        if step == self.rewind_step and self.rewind is None:
            self._snapshot()

    def _snapshot(self) -> None:
        model = self._check_attached("snapshot")
        self.rewind = {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
        }

    def round_sparsity(self, round_: int) -> float:
        return schedules.exponential(round_, rounds=self.rounds, final=self.sparsity)

    def next_round(self) -> None:
        """Prune to the next round's sparsity by trained magnitude, then rewind the survivors."""
        model = self._check_attached("next_round")
        if self.round >= self.rounds:
            raise SparsityError(f"all {self.rounds} rounds are done; the ticket is at sparsity {self.sparsity}")
        if self.rewind is None:
            raise SparsityError(f"no rewind point yet: train at least rewind_step={self.rewind_step} steps "
                                "(calling step() after each optimizer step) before next_round()")
        sparsity = self.round_sparsity(self.round + 1)
        old = [self.current_mask(i) for i in range(len(self.targets))]
        new = compute_masks(self.targets, sparsity, method="magnitude", scope=self.scope, pattern=self.pattern)
        model.load_state_dict(self.rewind["model"], strict=False)
        if self.optimizer is not None and self.rewind["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.rewind["optimizer"]))
        self.round += 1
        self.step_count = self.rewind_step
        dropped, grown = moves(old, new)
        self.set_masks(new, round=self.round, sparsity=sparsity, dropped=dropped, grown=grown, moved=dropped)

    def extra_state(self) -> dict[str, Any]:
        return {"round": self.round, "rewind": self.rewind}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        self.rewind = state.get("rewind")


def lottery_ticket(model: nn.Module, train_fn: Callable[[nn.Module, torch.optim.Optimizer, LotteryTicket], Any], *,
                   rounds: int = 3, sparsity: float = 0.9, rewind_step: int = 0,
                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                   **kwargs: Any) -> LotteryTicket:
    """Run iterative magnitude pruning with rewinding; returns the attached ``LotteryTicket``.

    ``train_fn(model, optimizer, ticket)`` trains one round and calls ``ticket.step()`` after
    every ``optimizer.step()``. It runs ``rounds + 1`` times: dense, then after each pruning.
    The model ends trained at ``sparsity`` with its masks in place.

    Example::

        def train_fn(model, optimizer, ticket):
            for x, y in loader:
                loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad(); ticket.step()

        ticket = lottery_ticket(model, train_fn, rounds=5, sparsity=0.95, rewind_step=100)
    """
    optimizer = make_optimizer(model) if make_optimizer else torch.optim.Adam(model.parameters(), lr=1e-3)
    ticket = LotteryTicket(sparsity, rounds=rounds, rewind_step=rewind_step, **kwargs).attach(model, optimizer)
    for _ in range(rounds):
        train_fn(model, optimizer, ticket)
        ticket.next_round()
    train_fn(model, optimizer, ticket)
    return ticket
