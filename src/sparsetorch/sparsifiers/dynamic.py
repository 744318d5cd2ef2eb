"""Dynamic sparse training: the topology changes during training at constant sparsity.

Every ``every`` steps (until ``end``) each layer drops its ``k`` smallest-magnitude kept
weights and grows exactly ``k`` new connections, so the total density never changes:

* ``SET`` (Mocanu et al. 2018) grows at random;
* ``RigL`` (Evci et al. 2020) grows where the dense gradient is largest;
* ``SRigL`` (Lasby et al. 2023) is RigL with a constant fan-in: each output unit drops and grows
  within its own row, so every unit keeps the same number of inputs.

``k = round(f_t * kept)`` with ``f_t`` the drop fraction decayed by ``schedules.cosine_decay``.
Grown weights start at zero and so does their optimizer state (momentum, Adam moments).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SparsityError
from ..core.patterns import as_2d
from ..core.distributed import full, is_distributed, is_sharded
from ..core.dropgrow import ablate_units, constant_fan_in_mask, drop_and_grow_flat, split_evenly, top_per_row
from .base import Sparsifier
from .common import DropGrowSchedule, check_choice, check_target_sparsity, rescale_by_fan_in, rows_cols
from ..core.distributions import layer_densities
from ..core.masks import get_mask

__all__ = ["DynamicSparsifier", "SET", "RigL", "SRigL"]


class DynamicSparsifier(DropGrowSchedule, Sparsifier):
    """Drop-and-grow at fixed density; subclasses choose what grows (``grow_scores``).

    Args:
        sparsity: overall fraction of target weights removed, from step 0 on.
        distribution: "uniform", "er" or "erk" split of the density across layers.
        every: steps between topology updates (the paper's delta T).
        drop_fraction: fraction of each layer's kept weights moved at the first update (alpha).
        decay: "cosine" (Evci et al. 2020) or "constant" decay of the drop fraction until ``end``.
        end: last update step (RigL stops at 75% of training). None: update forever with a
            constant fraction.
        reinit: sparsity-aware re-initialisation of the kept weights at attach (see ``Static``).
    """

    def __init__(self, sparsity: float = 0.9, *, distribution: str = "erk", every: int = 100,
                 drop_fraction: float = 0.3, decay: str = "cosine", end: int | None = None,
                 reinit: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.sparsity = check_target_sparsity(sparsity)
        self.distribution = check_choice(distribution, ("uniform", "er", "erk"), "distribution")
        self.set_schedule(every, drop_fraction, decay, end)
        self.reinit = bool(reinit)

    # ---- masks ------------------------------------------------------------------------
    def initial_masks(self) -> Iterator[torch.Tensor]:
        densities = layer_densities(self.distribution, [t.param.shape for t in self.targets], self.sparsity)
        return (self._random_mask(t.param.shape, d) for t, d in zip(self.targets, densities))

    def _random_mask(self, shape: torch.Size, density: float) -> torch.Tensor:
        numel = shape.numel()
        keep = int(round(density * numel))
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=self.generator)[:keep]] = True
        return mask.view(shape)

    def attach(self, model, optimizer=None) -> "DynamicSparsifier":
        super().attach(model, optimizer)
        if self.reinit:
            rescale_by_fan_in(self.targets)
        return self

    def grow_scores(self, i: int) -> torch.Tensor:
        """Scores (higher grows first) over layer ``i``'s positions; only inactive ones are used."""
        raise NotImplementedError

    def check_scores(self) -> None:
        """Raise before any mask changes if ``grow_scores`` cannot be computed."""

    def update(self, step: int) -> None:
        if not self.is_update_step(step):
            return
        fraction = self.fraction(step)
        if fraction <= 0.0:
            return
        self.check_scores()
        self.set_masks(self._new_masks(fraction), fraction=fraction, moves="grown", zero_grown=True)

    def _new_masks(self, fraction: float) -> Iterator[torch.Tensor]:
        """One layer at a time: under FSDP2 its weight, mask and scores are gathered whole, the same on
        every rank, and dropped once set_masks keeps the local shard of the new mask."""
        for i, t in enumerate(self.targets):
            grow = full(self.grow_scores(i))
            yield self.drop_and_grow(full(t.param.detach()), self.full_mask(i), grow, fraction)

    def drop_and_grow(self, weight: torch.Tensor, mask: torch.Tensor, grow: torch.Tensor,
                      fraction: float) -> torch.Tensor:
        """New mask: drop the k smallest |w| among kept, grow the k best ``grow`` among the rest.

        Evci et al. 2020, Alg. 1; k = round(fraction * kept), at most the number of inactive.
        """
        flat, w = mask.flatten().cpu(), weight.detach().abs().flatten().float().cpu()
        return drop_and_grow_flat(flat, w, grow.flatten().float().cpu(), fraction).view(mask.shape)


class SET(DynamicSparsifier):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop smallest |w|, grow at random.

    Example::

        sparsifier = SET(sparsity=0.9, every=100, drop_fraction=0.3, end=7500).attach(model, optimizer)
    """

    def grow_scores(self, i: int) -> torch.Tensor:
        return torch.rand(self.targets[i].param.shape, generator=self.generator)


class RigL(DynamicSparsifier):
    """Rigged Lottery (Evci et al. 2020): drop smallest |w|, grow largest dense |gradient|.

    The dense gradient is captured by a hook only during the backward pass of an update step
    (the step after which ``step()`` will update), so every other step costs nothing extra.
    Under DDP the captured gradient (local to a rank, taken before DDP's all-reduce) is
    averaged across ranks before use, so every rank grows the same connections. Under FSDP2 it is
    captured after FSDP's reduce-scatter (already the mean over ranks, sharded) and gathered one
    layer at a time at the update.
    Needs one backward pass before each ``step()`` that updates.

    Example::

        sparsifier = RigL(sparsity=0.9, every=100, drop_fraction=0.3, end=7500).attach(model, optimizer)
    """

    _dense: dict[int, torch.Tensor]  # target index -> dense gradient captured for the next update
    _hooks: list[torch.utils.hooks.RemovableHandle]

    def attach(self, model, optimizer=None) -> "RigL":
        super().attach(model, optimizer)
        self._dense, self._hooks = {}, []
        # our hook must see the gradient before the mask hook zeroes pruned entries, so the
        # masks are re-installed after it (hooks on a tensor run in registration order)
        from ..core.masks import remove_mask, set_mask

        for i, t in enumerate(self.targets):
            mask = self.current_mask(i)
            remove_mask(t.module, t.name)
            if is_sharded(t.param):  # FSDP2 writes the sharded gradient without autograd, then runs these
                self._hooks.append(t.param.register_post_accumulate_grad_hook(self._capture_sharded(i)))
            else:
                self._hooks.append(t.param.register_hook(self._capture(i)))
            set_mask(t.module, mask, t.name)
        return self

    def _capture(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            if self.model is not None and self.is_update_step(self.step_count + 1):
                g = grad.detach()
                self._dense[i] = self._dense[i] + g if i in self._dense else g.clone()
        return hook

    def _capture_sharded(self, i: int):
        target = self.targets[i]

        @torch.no_grad()
        def hook(param: torch.Tensor) -> None:
            if self.model is None or param.grad is None or not self.is_update_step(self.step_count + 1):
                return
            g = param.grad.detach()
            if i not in self._dense:
                self._dense[i] = g.clone()
                return
            # FSDP2 accumulates into param.grad, whose pruned entries the mask hook zeroed after the last
            # micro-batch: there g is this micro-batch's part, elsewhere the running sum
            mask = get_mask(target.module, target.name)
            self._dense[i] = torch.where(mask, g, self._dense[i] + g)
        return hook

    def check_scores(self) -> None:
        for i, t in enumerate(self.targets):
            if i not in self._dense:
                raise SparsityError(
                    f"RigL found no dense gradient for {t.qualified_name} at update step "
                    f"{self.step_count}; run loss.backward() before every optimizer.step()/sparsifier.step()",
                    layer=t.qualified_name,
                )

    def grow_scores(self, i: int) -> torch.Tensor:
        grad = self._dense[i]
        if is_sharded(grad):  # FSDP2 already averaged it over ranks in its reduce-scatter
            return grad.abs()
        if is_distributed():
            grad = grad.clone()
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        return grad.abs()

    def update(self, step: int) -> None:
        try:
            super().update(step)
        finally:
            if self.is_update_step(step):
                self._dense.clear()

    def remove(self):
        model = super().remove()
        for h in self._hooks:
            h.remove()
        self._hooks, self._dense = [], {}
        return model


class SRigL(RigL):
    """Structured RigL with constant fan-in (Lasby et al. 2023, "Dynamic Sparse Training with
    Structured Sparsity").

    Why this third method: it keeps RigL's gradient-guided growth (better than MEST's
    magnitude-plus-gradient heuristics at high sparsity, and unlike Top-KAST it needs no dense
    backward pass every step), and its constant fan-in -- every output unit keeps the same
    number of inputs -- gives a regular layout (equal nonzeros per row) that condensed/row-wise
    sparse kernels run fast. Each unit drops its k smallest-magnitude inputs and grows its k
    largest-gradient inactive inputs.

    Neuron ablation (the paper's Sec. 3.3): at an update, a unit with fewer than
    ``ablation * fan_in`` salient weights -- weights that unstructured RigL would keep (largest
    magnitude) or grow (largest gradient) in this layer -- is removed, and its inputs go to the
    remaining units, whose fan-in grows so that the layer's total stays exactly the same (when
    it does not divide evenly, some units get one input more). Removed units never come back.
    ``ablation=0`` turns it off.
    """

    def __init__(self, sparsity: float = 0.9, *, ablation: float = 0.3, **kwargs: Any):
        super().__init__(sparsity, **kwargs)
        if not 0.0 <= ablation < 1.0:
            raise SparsityError(f"ablation (gamma_sal) must lie in [0, 1), got {ablation}; 0 turns ablation off",
                                ablation=ablation)
        self.ablation = float(ablation)

    def fan_ins(self) -> list[int]:
        """One fan-in per layer: the distribution's density rounded to whole inputs per unit,
        then layers moved up by one input per unit while that brings the total closer to target."""
        shapes = [t.param.shape for t in self.targets]
        densities = layer_densities(self.distribution, shapes, self.sparsity)
        rc = [rows_cols(s) for s in shapes]
        fan = [min(c, max(1, int(d * c))) for d, (_, c) in zip(densities, rc)]
        budget = round((1.0 - self.sparsity) * sum(s.numel() for s in shapes))
        kept = sum(f * r for f, (r, _) in zip(fan, rc))
        by_remainder = sorted(range(len(fan)), key=lambda i: -(densities[i] * rc[i][1] - fan[i]))
        for i in by_remainder:
            rows, cols = rc[i]
            if fan[i] < cols and abs(kept + rows - budget) < abs(kept - budget):
                fan[i] += 1
                kept += rows
        return fan

    def initial_masks(self) -> Iterator[torch.Tensor]:
        fans = self.fan_ins()  # checked now; the masks are drawn one layer at a time
        return (constant_fan_in_mask(*rows_cols(t.param.shape), fan_in, self.generator).view(t.param.shape)
                for t, fan_in in zip(self.targets, fans))

    def drop_and_grow(self, weight: torch.Tensor, mask: torch.Tensor, grow: torch.Tensor,
                      fraction: float) -> torch.Tensor:
        m2, w2 = as_2d(mask.cpu()), as_2d(weight.detach().abs().float().cpu())  # [rows, cols]
        g2 = as_2d(grow.float().cpu())
        fan = m2.sum(dim=1)  # [rows]: K (or K+1) for live units, 0 for ablated ones
        live = fan > 0
        k = int(round(fraction * int(fan[live].min())))
        if self.ablation > 0:
            live = live & ~self._ablated(m2, w2, g2, live, k)
        target = split_evenly(int(fan.sum()), live, w2.shape[1])  # [rows] new fan-in
        if k <= 0 and torch.equal(target, fan):
            return mask.cpu()
        inf = float("inf")
        drop = torch.where(live, torch.full_like(fan, k).clamp(max=fan), fan)  # ablated units drop all
        after = m2 & ~top_per_row(torch.where(m2, -w2, torch.full_like(w2, -inf)), drop)
        grow_n = (target - (fan - drop)).clamp(min=0)
        return (after | top_per_row(torch.where(after, torch.full_like(g2, -inf), g2), grow_n)).view(mask.shape)

    def _ablated(self, m2: torch.Tensor, w2: torch.Tensor, g2: torch.Tensor, live: torch.Tensor,
                 k: int) -> torch.Tensor:
        """Units with fewer than ``ablation * fan_in`` salient weights (never all of them)."""
        nnz, n_live = int(m2.sum()), int(live.sum())
        k_layer = k * n_live
        salient = torch.zeros_like(m2)
        keep = torch.topk(torch.where(m2, w2, torch.full_like(w2, -1.0)).flatten(), nnz - k_layer).indices
        salient.view(-1)[keep] = True
        if k_layer > 0:
            candidates = torch.where(~m2 & live[:, None], g2, torch.full_like(g2, -1.0)).flatten()
            salient.view(-1)[torch.topk(candidates, k_layer).indices] = True
        return ablate_units((salient & live[:, None]).sum(dim=1), m2.sum(dim=1), live, self.ablation)

