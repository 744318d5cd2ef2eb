"""SET and RigL on compressed layers: connections move between steps, nnz stays fixed, W is never dense.

Every ``update_every`` optimizer steps each SparseLinear drops the k = f_t * nnz kept weights of smallest
magnitude and regrows k positions that were inactive: uniformly at random (SET, Mocanu et al. 2018) or
with the largest dense-gradient magnitude (RigL, Evci et al. 2020). f_t decays as
``drop_fraction * (1 + cos(pi * t / end_step)) / 2`` (RigL's cosine schedule; constant without end_step).
Regrown weights start at 0 and so does their optimizer state (Adam moments, SGD momentum); kept weights keep
their values and state, which are permuted along with the CSR order.

RigL needs dL/dW at every position, but only on update steps: the step before an update arms the layers,
their backward then also forms the dense dY^T X once (a dense [out, in] matrix for that step only), and the
update frees it.

Usage (call ``step()`` after every ``optimizer.step()``)::

    model = sparsetorch.to_sparse_training(model, 0.9)
    opt = torch.optim.Adam(model.parameters())
    dst = CompressedRigL(model, opt, update_every=100, end_step=total_steps)
    for batch in data:
        loss(model, batch).backward(); opt.step(); opt.zero_grad(); dst.step()
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparsityError
from .layer import SparseLinear, sample_positions


class CompressedDST:
    """Base class: magnitude drop at fixed nnz; subclasses choose the regrown positions (``grow``)."""

    needs_dense_grad = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, update_every: int = 100,
                 drop_fraction: float = 0.3, end_step: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
        if not self.layers:
            raise SparsityError("the model has no SparseLinear layer: call sparsetorch.to_sparse_training first")
        if update_every < 1:
            raise SparsityError(f"update_every must be >= 1, got {update_every}")
        if not 0.0 <= drop_fraction <= 1.0:
            raise SparsityError(f"drop_fraction must lie in [0, 1], got {drop_fraction}")
        self.optimizer, self.update_every, self.drop_fraction, self.end_step = (optimizer, update_every,
                                                                                drop_fraction, end_step)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.t = 0
        self.history: list[dict] = []
        self._arm(self._due(1))

    # ------------------------------------------------------------------ schedule
    def _due(self, t: int) -> bool:
        return t % self.update_every == 0 and (self.end_step is None or t < self.end_step)

    def fraction(self, t: int) -> float:
        if self.end_step is None:
            return self.drop_fraction
        return self.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * min(t, self.end_step) / self.end_step))

    def _arm(self, on: bool) -> None:
        if self.needs_dense_grad:
            for _, m in self.layers:
                m._want_dense_grad = on

    def step(self) -> None:
        """Call after each optimizer step: updates the connectivity when one is due."""
        self.t += 1
        if self._due(self.t):
            self.update()
        self._arm(self._due(self.t + 1))

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> int:
        """Move connections in every layer now; returns how many moved in total."""
        frac, moved = self.fraction(self.t), 0
        if self.needs_dense_grad and any(getattr(m, "dense_grad", None) is None for _, m in self.layers):
            raise SparsityError("RigL update without a dense gradient: call step() after every optimizer step "
                                "(and run backward between them) so the update step's gradient is recorded")
        for name, layer in self.layers:
            k = int(round(frac * layer.nnz))
            k = min(k, layer.in_features * layer.out_features - layer.nnz)  # no free position: nothing moves
            if k > 0:
                self._move(layer, k)
                moved += k
            layer.dense_grad = None
        self.history.append({"step": self.t, "moved": moved, "fraction": frac})
        return moved

    def grow(self, layer: SparseLinear, k: int, active: torch.Tensor) -> torch.Tensor:
        """k flat positions (row * in + col) not in ``active`` (sorted int64) to regrow."""
        raise NotImplementedError

    def _move(self, layer: SparseLinear, k: int) -> None:
        flat = layer.flat_positions()                                        # [nnz] sorted
        vals = layer.values.detach()
        keep = torch.argsort(vals.abs(), stable=True)[k:]                   # storage slots that stay
        grown = self.grow(layer, k, flat).to(flat.device)
        new_flat, order = torch.sort(torch.cat([flat[keep], grown]))
        src = torch.cat([keep, torch.full((k,), -1, dtype=torch.int64, device=flat.device)])[order]
        tensors = [layer.values.data]
        if self.optimizer is not None:  # Adam moments, SGD momentum...: follow their weights, 0 for new ones
            state = self.optimizer.state.get(layer.values, {})
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == layer.values.shape]
        live = src >= 0
        for t in tensors:
            moved = torch.zeros_like(t)
            moved[live] = t[src[live]]
            t.copy_(moved)
        layer.values.grad = None
        layer.set_connectivity(new_flat)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"t": self.t, "history": list(self.history), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.history = int(state["t"]), list(state["history"])
        self.generator.set_state(state["generator"])
        self._arm(self._due(self.t + 1))


class CompressedSET(CompressedDST):
    """SET: regrow uniformly at random among the inactive positions (rejection sampling, no dense buffer)."""

    def grow(self, layer, k, active):
        return sample_positions(layer.in_features * layer.out_features, k, active.cpu(), self.generator)


class CompressedRigL(CompressedDST):
    """RigL: regrow the inactive positions with the largest |dL/dW| of the step before the update."""

    needs_dense_grad = True

    def grow(self, layer, k, active):
        g = getattr(layer, "dense_grad", None)
        if g is None:
            raise SparsityError("RigL update without a dense gradient: call step() after every optimizer step "
                                "(and run backward between them) so the update step's gradient is recorded")
        score = g.abs().flatten().clone()                                    # [out * in], this step only
        score[active] = -1.0
        return torch.topk(score, k, sorted=False).indices
