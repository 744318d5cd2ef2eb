"""SET and RigL on compressed layers: connections move between steps, nnz stays fixed, W is never dense.

``CompressedSET`` / ``CompressedRigL`` are ``Sparsifier``s with the hyperparameters, schedule and drop-and-grow
rule of ``sparsetorch.SET`` / ``sparsetorch.RigL`` (sparsifiers/dynamic.py; both use core/dropgrow.py), but they act on the SparseLinear
layers made by ``to_sparse_training`` instead of on masks over dense weights. Every ``every`` steps (until
``end``) each layer drops its k = round(f_t * nnz) smallest-magnitude kept weights and grows k positions that
are inactive after the drop: uniformly at random (SET, Mocanu et al. 2018) or with the largest dense-gradient
magnitude (RigL, Evci et al. 2020); f_t is ``drop_fraction`` decayed by ``schedules.cosine_decay`` (or constant).
Newly grown weights start at 0 and so does their optimizer state (Adam moments, SGD momentum); kept weights (and
a just-dropped weight that is grown back) keep their values and state, which are permuted along with the CSR order.

RigL needs dL/dW at every position, but only on update steps: the step before an update arms the layers,
their backward then also forms dY^T X a block of rows at a time and keeps only the k best inactive positions
and |dL/dW| at the kept ones (growth.py); with gradient accumulation (``grad_accumulation=n``) or under DDP
the dense [out, in] gradient is kept for that step instead. The update frees it.

Usage (call ``step()`` after every ``optimizer.step()``, as for every sparsifier)::

    model = sparsetorch.to_sparse_training(model, sparsity=0.9)        # the layers hold the sparsity
    optimizer = torch.optim.Adam(model.parameters())
    dst = CompressedRigL(every=100, drop_fraction=0.3, end=int(0.75 * total_steps)).attach(model, optimizer)
    for batch in data:
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad(); dst.step()

Checkpoints: the connectivity lives in ``model.state_dict()`` (indptr/indices/values); ``dst.state_dict()``
holds the step, history and generator. Save and load both (``sparsetorch.integrations.save_training_state``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import schedules
from ..core.distributions import layer_densities
from ..errors import SparsityError, check_sparsity
from ..core.layer_selection import Spec, Target, as_spec_list, matches_spec
from ..core.distributed import is_distributed
from ..core.dropgrow import ablate_units, constant_fan_in_positions, split_evenly, top_per_row
from .base import Sparsifier, check_in_optimizer
from .common import DropGrowSchedule, check_choice
from ..sparse_training import growth
from ..sparse_training.layer_swap import broadcast_connectivity
from ..sparse_training.sparse_linear import SparseLinear, sample_positions

__all__ = ["CompressedDST", "CompressedSET", "CompressedRigL", "CompressedSRigL", "compressed_targets"]


def compressed_targets(model: nn.Module, include: Spec = None, exclude: Spec = None) -> list[Target]:
    """The SparseLinear layers of ``model`` as targets (parameter ``values``), filtered like ``select_targets``:
    ``include`` (types or name globs) replaces the default of every SparseLinear, ``exclude`` removes matches."""
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)]
    if not layers:
        raise SparsityError("the model has no SparseLinear layer: call sparsetorch.to_sparse_training(model, "
                            "sparsity=...) first, or use sparsetorch.SET / sparsetorch.RigL on dense layers")
    includes = as_spec_list(include)
    for spec in includes:
        if not any(matches_spec(fqn, m, [spec]) for fqn, m in layers):
            raise SparsityError(f"include pattern {spec!r} matches no SparseLinear layer; names look like "
                                f"{[fqn for fqn, _ in layers[:5]]}", include=spec)
    chosen = [(fqn, m) for fqn, m in layers if not includes or matches_spec(fqn, m, includes)]
    chosen = [(fqn, m) for fqn, m in chosen if not matches_spec(fqn, m, as_spec_list(exclude))]
    if not chosen:
        raise SparsityError("no SparseLinear layer left after include/exclude")
    return [Target(fqn, m, "values") for fqn, m in chosen]


class CompressedDST(DropGrowSchedule, Sparsifier):
    """Drop-and-grow on SparseLinear layers at fixed nnz; subclasses choose the grown positions (``grow``).

    Args (the names and meaning of ``sparsetorch.SET`` / ``RigL``):
        every: steps between topology updates (the paper's delta T).
        drop_fraction: fraction of each layer's kept weights moved at the first update (alpha), in (0, 1).
        decay: "cosine" (Evci et al. 2020) or "constant" decay of the drop fraction until ``end``.
        end: last update step (RigL stops at 75% of training). None: update forever with a constant fraction.
        sparsity / distribution: optional. The layers already hold their sparsity (``to_sparse_training``
            sets it); when given, ``attach`` checks the layers match them, so the keyword arguments of
            ``registry.for_run("rigl", ...)`` can be passed unchanged.
        include / exclude: which SparseLinear layers move (default: all); generator: every random choice.
    """

    needs_dense_grad = False

    def __init__(self, sparsity: float | None = None, *, distribution: str | None = None, every: int = 100,
                 drop_fraction: float = 0.3, decay: str = "cosine", end: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)
        self.distribution = (None if distribution is None
                             else check_choice(distribution, ("uniform", "er", "erk"), "distribution"))
        self.set_schedule(every, drop_fraction, decay, end)

    # ---- the Sparsifier interface ----------------------------------------------------------
    @property
    def layers(self) -> list[SparseLinear]:
        return [t.module for t in self.targets]

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "CompressedDST":
        """Take the SparseLinear layers of ``model`` (their connectivity is the initial one) and return self."""
        self._check_detached()
        targets = compressed_targets(model, self.include, self.exclude)
        check_in_optimizer(optimizer, targets)
        self._check_layout(targets)
        self.model, self.optimizer, self.targets = model, optimizer, targets
        if is_distributed():  # every rank starts from rank 0's connectivity, then makes the same decisions
            broadcast_connectivity(model)
        self.history.append({"step": self.step_count, "density": self.density(), "moved": 0})
        self._arm(self.is_update_step(self.step_count + 1))
        return self

    def step(self) -> None:
        """Advance one training step; call after every ``optimizer.step()``."""
        super().step()
        self._arm(self.is_update_step(self.step_count + 1))

    def remove(self) -> nn.Module:
        """Stop moving connections and detach; the layers stay SparseLinear (``sparsetorch.to_dense`` for nn.Linear)."""
        model = self._check_attached("remove")
        self._arm(False)
        for layer in self.layers:
            growth.clear(layer)
        self.model, self.optimizer, self.targets = None, None, []
        return model

    def density(self) -> float:
        total = sum(m.in_features * m.out_features for m in self.layers)
        return sum(m.nnz for m in self.layers) / max(total, 1)

    def set_masks(self, masks, record: bool = True, **info: Any) -> None:
        raise SparsityError(f"{type(self).__name__} moves connections inside the SparseLinear layers, not through "
                            "masks; use the masked sparsetorch.SET / RigL on dense layers to set masks")

    def current_mask(self, i: int) -> torch.Tensor:
        raise SparsityError(f"{type(self).__name__} keeps no dense masks; SparseLinear.flat_positions() gives the "
                            "kept positions of a layer")

    # ---- update ------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.is_update_step(step):
            return
        fraction = self.fraction(step)
        try:
            if fraction <= 0.0:
                return
            if self.needs_dense_grad:
                self._check_dense_grads()  # before anything moves: nothing half-changed on error
            moved = 0
            for layer in self.layers:
                k = self.move_count(layer, fraction)
                if k > 0:
                    moved += self._move(layer, k)
            self.history.append({"step": step, "density": self.density(), "moved": moved, "fraction": fraction,
                                 "dropped": moved, "grown": moved})  # at fixed nnz, as many dropped as grown
        finally:
            for layer in self.layers:
                growth.clear(layer)

    def move_count(self, layer: SparseLinear, fraction: float) -> int:
        """How many weights of ``layer`` the update moves: round(fraction * nnz), at most the free positions."""
        return min(int(round(fraction * layer.nnz)), layer.in_features * layer.out_features - layer.nnz)

    def select(self, layer: SparseLinear, k: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage slots to drop, flat positions to grow), as many of each, given the kept positions ``flat``
        ([nnz] sorted): the k smallest |w|, then ``grow``."""
        dropped = torch.argsort(layer.values.detach().abs(), stable=True)[:k]  # storage slots of the k smallest
        is_kept = torch.ones_like(flat, dtype=torch.bool)
        is_kept[dropped] = False
        return dropped, self.grow(layer, k, flat[is_kept], dropped)

    def grow(self, layer: SparseLinear, k: int, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """k flat positions (row * in + col) not in ``kept`` (sorted int64, after the drop) to grow;
        ``dropped``: the storage slots of the k weights just dropped (they may be grown back)."""
        raise NotImplementedError

    def _move(self, layer: SparseLinear, k: int) -> int:
        """Drop and grow (``select``), carry values and optimizer state; returns how many positions are new (a
        dropped position grown back keeps its weight, as in dynamic.py)."""
        flat = layer.flat_positions()                                        # [nnz] sorted
        dropped, grown = self.select(layer, k, flat)
        is_kept = torch.ones_like(flat, dtype=torch.bool)
        is_kept[dropped] = False
        new_flat = torch.cat([flat[is_kept], grown.to(flat.device)]).sort().values
        # where each new position was stored before (-1: new connection, starts at 0)
        slot = torch.searchsorted(flat, new_flat).clamp(max=flat.numel() - 1)
        src = torch.where(flat[slot] == new_flat, slot, torch.full_like(slot, -1))
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
        return int((~live).sum())

    # ---- RigL's dense gradient ------------------------------------------------------------
    def _arm(self, on: bool) -> None:
        """Ask the layers' next backward for regrowth scores (RigL), for the update at step_count + 1."""
        if not self.needs_dense_grad:
            return
        fraction = self.fraction(self.step_count + 1) if on else 0.0
        for layer in self.layers:
            layer._want_dense_grad = on and fraction > 0.0
            numel = layer.in_features * layer.out_features
            layer._grow_k = None if self._keep_dense() else min(int(round(fraction * layer.nnz)), numel - layer.nnz)

    def _keep_dense(self) -> bool:
        return False

    def _check_dense_grads(self) -> None:
        for t in self.targets:
            if not growth.has_record(t.module):
                raise SparsityError(
                    f"{type(self).__name__} found no dense gradient for {t.fqn} at update step {self.step_count}; "
                    "run loss.backward() before every optimizer.step()/sparsifier.step()", layer=t.fqn)

    def _check_layout(self, targets: list[Target]) -> None:
        """With ``sparsity`` (and ``distribution``) given, the layers must hold them (one weight of rounding)."""
        if self.sparsity is None:
            return
        shapes = [(t.module.out_features, t.module.in_features) for t in targets]
        numel = [o * i for o, i in shapes]
        have = sum(t.module.nnz for t in targets) / sum(numel)
        bad = []
        if self.distribution is not None:
            wanted = layer_densities(self.distribution, shapes, self.sparsity)
            bad = [t.fqn for t, d, n in zip(targets, wanted, numel) if abs(t.module.nnz - d * n) > 1.0]
        if abs((1.0 - have) - self.sparsity) > len(targets) / sum(numel) or bad:
            raise SparsityError(
                f"the SparseLinear layers are {1.0 - have:.4g} sparse"
                + (f" and layers {bad[:3]} do not follow distribution {self.distribution!r}" if bad else "")
                + f", not sparsity={self.sparsity} as asked: the layers hold their sparsity; convert with "
                "to_sparse_training(model, sparsity, distribution) and pass the same values (or leave them out)",
                sparsity=self.sparsity)

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, history and generator; the connectivity itself is in ``model.state_dict()``."""
        self._check_attached("state_dict")
        return {
            "step": self.step_count,
            "layers": {t.fqn: [t.module.out_features, t.module.in_features, t.module.nnz] for t in self.targets},
            "history": [dict(row) for row in self.history],
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; load the model's own state_dict too (it holds the connectivity)."""
        self._check_attached("load_state_dict")
        have = {t.fqn: [t.module.out_features, t.module.in_features, t.module.nnz] for t in self.targets}
        saved = {name: [int(v) for v in shape] for name, shape in state.get("layers", {}).items()}
        if saved != have:
            raise SparsityError(
                "sparsifier state does not match the attached model's SparseLinear layers (name: [out, in, nnz]): "
                f"saved {dict(list(saved.items())[:3])}, model {dict(list(have.items())[:3])}")
        self.step_count = int(state["step"])
        self.history = [dict(row) for row in state.get("history", [])]
        self.generator.set_state(state["generator"])
        self.load_extra_state(state.get("extra", {}))
        for layer in self.layers:
            growth.clear(layer)
        self._arm(self.is_update_step(self.step_count + 1))


class CompressedSET(CompressedDST):
    """SET on SparseLinear: drop smallest |w|, grow uniformly at random among the inactive positions
    (rejection sampling, no dense buffer).

    Example::

        dst = CompressedSET(every=100, drop_fraction=0.3, end=7500).attach(model, optimizer)
    """

    def grow(self, layer, k, kept, dropped):
        return sample_positions(layer.in_features * layer.out_features, k, kept.cpu(), self.generator)


class CompressedRigL(CompressedDST):
    """RigL on SparseLinear: drop smallest |w|, grow the inactive positions with the largest |dL/dW| of the
    update step's backward.

    The backward before an update keeps only each layer's k best inactive positions (growth.py), never the
    whole dense gradient; ``grad_accumulation=n`` (n backward passes per optimizer step) and DDP keep the dense
    gradient of that step instead (summed over the micro-batches, averaged across ranks).

    Example::

        dst = CompressedRigL(every=100, drop_fraction=0.3, end=7500).attach(model, optimizer)
    """

    needs_dense_grad = True

    def __init__(self, sparsity: float | None = None, *, grad_accumulation: int = 1, **kwargs: Any):
        super().__init__(sparsity, **kwargs)
        self.grad_accumulation = schedules.check_every(grad_accumulation, "grad_accumulation")

    def _keep_dense(self) -> bool:
        return self.grad_accumulation > 1 or is_distributed()

    def grow(self, layer, k, kept, dropped):
        if getattr(layer, "dense_grad", None) is not None and is_distributed():
            dist.all_reduce(layer.dense_grad)  # the sum ranks like the mean: every rank grows the same positions
        return growth.best_grown(layer, k, kept, dropped)


class CompressedSRigL(CompressedRigL):
    """SRigL on SparseLinear (Lasby et al. 2023; the masked ``sparsetorch.SRigL``): constant fan-in, every
    output unit keeps the same number of inputs; each unit drops its k smallest-|w| inputs and grows its k
    largest-|dL/dW| inactive ones, and units with fewer than ``ablation * fan_in`` salient weights are removed,
    their inputs going to the remaining units (the layer's nnz stays exact; ``ablation=0`` turns it off).

    ``attach`` lays out each layer whose rows do not already hold equal counts (up to one) with constant fan-in:
    nnz / out random inputs per row (the first rows take the remainder), drawn from ``generator``; the layer's
    values are kept in storage order (fresh-init values stay init values) and their optimizer state is reset.
    Per-unit growth and ablation read the dense dL/dW of the update step (formed only then, freed after).

    Example::

        dst = CompressedSRigL(every=100, drop_fraction=0.3, end=7500, ablation=0.3).attach(model, optimizer)
    """

    def __init__(self, sparsity: float | None = None, *, ablation: float = 0.3, **kwargs: Any):
        super().__init__(sparsity, **kwargs)
        if not 0.0 <= ablation < 1.0:
            raise SparsityError(f"ablation (gamma_sal) must lie in [0, 1), got {ablation}; 0 turns ablation off",
                                ablation=ablation)
        self.ablation = float(ablation)

    def _keep_dense(self) -> bool:
        return True

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "CompressedSRigL":
        super().attach(model, optimizer)
        for layer in self.layers:
            fan = layer.indptr.diff()
            if int(fan.max() - fan.min()) > 1:
                layer.set_connectivity(constant_fan_in_positions(layer.out_features, layer.in_features, layer.nnz,
                                                                 self.generator))
                if optimizer is not None:
                    optimizer.state.pop(layer.values, None)
        if is_distributed():
            broadcast_connectivity(model)
        return self

    def move_count(self, layer: SparseLinear, fraction: float) -> int:
        """Per unit: round(fraction * the smallest fan-in of a live unit)."""
        fan = layer.indptr.diff()
        live = fan[fan > 0]
        return int(round(fraction * int(live.min()))) if live.numel() else 0

    def select(self, layer: SparseLinear, k: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if is_distributed():
            dist.all_reduce(layer.dense_grad)  # the sum ranks like the mean: every rank makes the same moves
        inp = layer.in_features
        g = layer.dense_grad.abs().float().cpu()                            # [out, in]
        flat, absw = flat.cpu(), layer.values.detach().abs().float().cpu()
        fan = layer.indptr.diff().cpu()                                     # [out]
        live = fan > 0
        if self.ablation > 0:
            live = live & ~self._ablated(layer, flat, absw, g, fan, live, k)
        target = split_evenly(layer.nnz, live, inp)                        # [out] fan-in after the update
        # live units drop k (more if their new fan-in is smaller), ablated units drop everything
        drop = torch.where(live, torch.maximum(torch.full_like(fan, k), fan - target).clamp(max=fan), fan)
        rows = flat // inp
        order = torch.argsort(absw, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]              # slots by row, ascending |w|
        rank_in_row = torch.arange(flat.numel()) - layer.indptr.cpu()[rows[order]]
        dropped = order[rank_in_row < drop[rows[order]]]
        is_kept = torch.ones_like(flat, dtype=torch.bool)
        is_kept[dropped] = False
        score = g.clone()
        score.view(-1)[flat[is_kept]] = -float("inf")                       # grow among the inactive after the drop
        grow_n = target - (fan - drop)                                      # >= 0 by the choice of drop
        grown = top_per_row(score, grow_n).flatten().nonzero().flatten()
        return dropped.to(layer.values.device), grown

    def _ablated(self, layer, flat, absw, g, fan, live, k: int) -> torch.Tensor:
        """Units with fewer than ``ablation * fan_in`` salient weights: the weights unstructured RigL would keep
        (largest |w|) or grow (largest |g| among inactive inputs of live units). Never every unit."""
        n_live, inp = int(live.sum()), layer.in_features
        k_layer = k * n_live
        keep = torch.topk(absw, layer.nnz - k_layer).indices
        count = torch.bincount(flat[keep] // inp, minlength=layer.out_features)
        if k_layer > 0:
            candidates = torch.where(live[:, None], g, torch.full_like(g, -1.0))
            candidates.view(-1)[flat] = -1.0
            count += torch.bincount(torch.topk(candidates.flatten(), k_layer).indices // inp,
                                    minlength=layer.out_features)
        return ablate_units(count, fan, live, self.ablation)

