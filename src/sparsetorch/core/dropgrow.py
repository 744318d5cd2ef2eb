"""Drop-and-grow as pure functions over positions, magnitudes and scores.

Shared by the masked sparsifiers (``sparsifiers/dynamic.py``: dense weights and bool masks) and the
compressed ones (``sparsifiers/compressed.py``: SparseLinear layers, sorted flat positions), so both make the
same choices for the same seed. Nothing here touches a model, an optimizer or torch.distributed.
"""
from __future__ import annotations

import torch

__all__ = ["drop_and_grow_flat", "split_evenly", "top_per_row", "ablate_units", "constant_fan_in_positions",
           "constant_fan_in_mask"]


def drop_and_grow_flat(mask: torch.Tensor, magnitude: torch.Tensor, grow: torch.Tensor,
                       fraction: float) -> torch.Tensor:
    """New flat bool mask: drop the k smallest ``magnitude`` kept, grow the k best ``grow`` among the rest.

    RigL: Evci et al. 2020, Alg. 1 (SET, Mocanu et al. 2018, with random ``grow``); k = round(fraction * kept),
    at most the inactive count. A just-dropped position may be grown back (as in the RigL reference code).
    """
    kept = int(mask.sum())
    k = min(int(round(fraction * kept)), mask.numel() - kept)
    if k <= 0:
        return mask
    drop_score = torch.where(mask, magnitude, torch.full_like(magnitude, float("inf")))
    after = mask.clone()
    after[torch.topk(drop_score, k, largest=False).indices] = False
    grow_score = torch.where(after, torch.full_like(grow, -float("inf")), grow)
    after[torch.topk(grow_score, k).indices] = True
    return after


def split_evenly(total: int, live: torch.Tensor, cols: int) -> torch.Tensor:
    """Per-row counts summing to ``total`` over the ``live`` rows, as equal as possible (<= cols).

    SRigL's constant fan-in after neuron ablation: Lasby et al. 2023, Sec. 3.3.
    """
    n = int(live.sum())
    base, extra = divmod(total, n)
    if base >= cols:  # a full layer: every live row takes all its inputs
        return torch.where(live, torch.full(live.shape, cols), torch.zeros(live.shape, dtype=torch.long))
    counts = torch.where(live, torch.full(live.shape, base), torch.zeros(live.shape, dtype=torch.long))
    rank = torch.cumsum(live.long(), 0) - 1  # 0.. among live rows; the first `extra` take one more
    return counts + (live & (rank < extra)).long()


def top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [rows, cols]: the ``counts[r]`` highest scores of each row r (SRigL's per-unit drop/grow,
    Lasby et al. 2023)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return ranks < counts[:, None]


def ablate_units(salient: torch.Tensor, fan: torch.Tensor, live: torch.Tensor, ablation: float) -> torch.Tensor:
    """Bool [rows]: live units with fewer than ``ablation * fan`` salient weights, never all of them.

    SRigL's neuron ablation, Lasby et al. 2023, Sec. 3.3; ``salient``: per-row count of the weights that
    unstructured RigL would keep or grow.
    """
    ablate = live & (salient < ablation * fan)
    if bool(ablate.sum() == live.sum()):  # keep the most salient unit rather than empty the layer
        ablate[torch.argmax(torch.where(live, salient, torch.full_like(salient, -1)))] = False
    return ablate


def constant_fan_in_positions(out: int, inp: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted flat positions with nnz // out random inputs per row (the first nnz % out rows one more).

    SRigL's constant fan-in layout, Lasby et al. 2023.
    """
    base, extra = divmod(nnz, out)
    fan = torch.full((out,), base, dtype=torch.long)
    fan[:extra] += 1
    noise = torch.rand(out, inp, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)                             # a random order of inputs per row
    chosen = ranks < fan[:, None]                                           # [out, in]
    return chosen.flatten().nonzero().flatten()


def constant_fan_in_mask(rows: int, cols: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [rows, cols] with exactly ``fan_in`` random inputs per row (SRigL, Lasby et al. 2023)."""
    noise = torch.rand(rows, cols, generator=generator)
    idx = torch.topk(noise, fan_in, dim=1).indices  # [rows, fan_in] random inputs per unit
    return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
