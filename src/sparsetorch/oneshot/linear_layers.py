"""Linear-like layers and the input statistics one-shot pruning collects from them.

A layer is *linear-like* if it computes ``x @ W^T + b`` on the last input dimension:
``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is stored transposed ``[in, out]``.
All math uses the ``[out, in]`` view.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.distributed import all_reduce_sum, is_distributed
from ..core.masks import get_mask, set_mask


def is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2


def mask_zeros(model: nn.Module) -> int:
    """Give every Linear-like layer of ``model`` that holds zeros and has no mask the mask of its nonzeros
    (a pruned model read back from a plain checkpoint, zeros in place). Returns how many got one."""
    count = 0
    for _, module in model.named_modules():
        w = getattr(module, "weight", None)
        if is_linear_like(module) and w is not None and get_mask(module) is None and bool((w == 0).any()):
            set_mask(module, w.detach() != 0)
            count += 1
    return count


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` view of the layer's weight (no copy)."""
    return module.weight.t() if is_transposed(module) else module.weight


def in_features(module: nn.Module) -> int:
    return weight_2d(module).shape[1]


def to_param_layout(module: nn.Module, tensor_2d: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` tensor laid out like the module's weight."""
    return tensor_2d.t().contiguous() if is_transposed(module) else tensor_2d


class TokenMask:
    """Which positions of the sample now running are real tokens (``[batch, seq]`` bool, None = all).

    The driver sets ``current`` before each calibration item; the statistics hooks drop the
    padded positions of any input shaped ``[batch, seq, features]`` like it, or flattened to
    ``[batch * seq, features]`` (what an MoE layer hands its shared expert and its experts)."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    def rows(self, n: int) -> torch.Tensor | None:
        """Which of ``n`` flattened token positions are real (``[n]`` bool), None if unknown for ``n``."""
        mask = self.current
        return mask.reshape(-1) if mask is not None and mask.numel() == n else None

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., features]`` as ``[n, features]`` rows of real tokens only."""
        mask = self.current
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.to(x.device)]
        real = self.rows(x.shape[0]) if x.dim() == 2 else None
        if real is not None:
            return x[real.to(x.device)]
        return x.reshape(-1, x.shape[-1])


class InputStats:
    """Running statistics of a layer's inputs X ``[n, in]``: the count, per-input sums and squared
    norms (Wanda, OWL, RIA; the mean for DSnoT) and, when ``hessian`` is set, X^T X (SparseGPT,
    ALPS, DSnoT), on ``device``.

    Each ``add`` (one calibration item) is computed in float32 and accumulated in float64 (``totals``);
    the statistics are handed out in float32. The same items summed in any order (another item order,
    shards on several ranks then all-reduced) then round to the same float32 values except within one
    float64 ulp of a rounding boundary, so a distributed run solves the single process's problems, rather
    than problems a float32 ulp apart whose near-tied weights SparseGPT would choose differently."""

    def __init__(self, features: int, device: torch.device, hessian: bool) -> None:
        self.count = 0
        zeros = dict(dtype=torch.float64, device=device)
        self.totals = {"sum": torch.zeros(features, **zeros),  # sum_n x_j
                       "sq_norm": torch.zeros(features, **zeros)}  # sum_n x_j^2
        if hessian:
            self.totals["xtx"] = torch.zeros(features, features, **zeros)  # sum_n x x^T
        self.layers = 1  # how many layers read these statistics (layers fed the very same inputs share them)

    def copy(self) -> InputStats:
        """An independent copy (for one layer), bit for bit."""
        twin = InputStats.__new__(InputStats)
        twin.count, twin.layers = self.count, 1
        twin.totals = {key: total.clone() for key, total in self.totals.items()}
        return twin

    @property
    def device(self) -> torch.device:
        return self.totals["sum"].device

    @property
    def has_hessian(self) -> bool:
        return "xtx" in self.totals

    @property
    def sum(self) -> torch.Tensor:
        return self.totals["sum"].float()

    @property
    def sq_norm(self) -> torch.Tensor:
        return self.totals["sq_norm"].float()

    @property
    def xtx(self) -> torch.Tensor | None:
        return self.totals["xtx"].float() if self.has_hessian else None

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x [n, in]``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.device, dtype=torch.float32)  # [n, in]
        self.count += x.shape[0]
        self.totals["sum"] += x.sum(dim=0)
        self.totals["sq_norm"] += x.square().sum(dim=0)
        if self.has_hessian:
            add_in_rows(self.totals["xtx"], x.t() @ x)

    def mean(self) -> torch.Tensor:
        return (self.totals["sum"] / max(self.count, 1)).float()

    def finish(self) -> None:
        """Round the accumulators to float32 once every item (and every rank's shard) is in: the statistics
        handed out do not change, and the solvers no longer hold a float64 X^T X beside its float32 copy
        (242 + 121 MB for a 5504-wide layer, where one-shot pruning out of core is bounded by memory)."""
        self.totals = {key: total.float() for key, total in self.totals.items()}

    def take_hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (the curvature of the layer-wise squared reconstruction error), float32, handed over:
        the stats drop their X^T X (scaled in place once finished), so a solve never holds two [in, in] copies."""
        assert self.has_hessian and self.count > 0
        if self.layers > 1:  # another layer still reads it: this one gets a scaled copy (the same bits)
            self.layers -= 1
            return self.totals["xtx"].float().mul(2.0 / self.count)
        return self.totals.pop("xtx").float().mul_(2.0 / self.count)


def add_in_rows(total: torch.Tensor, part: torch.Tensor, elements: int = 1 << 19) -> None:
    """``total += part`` a few rows at a time. Adding a float32 ``part`` into a float64 ``total`` in one op makes a
    float64 copy of all of ``part`` first (242 MB for a 5504-wide X^T X, at the peak of one-shot pruning out
    of core); per slice the copy is at most ``elements`` values. Elementwise, so the sums are the same bits."""
    rows = max(1, elements // max(part.shape[-1], 1))
    for start in range(0, part.shape[0], rows):
        total[start:start + rows] += part[start:start + rows]


def all_reduce_stats(stats: Mapping[str, InputStats], failed: bool = False) -> bool:
    """Sum every layer's statistics over the ranks of a torch.distributed run, in place, so that each rank
    holds those of the whole calibration set; returns whether ``failed`` was True on any rank.

    The counts, sums, squared norms and X^T X are all sums over tokens, so adding them across shards is
    adding them across samples: a rank with fewer real tokens (shorter or padded items, a smaller shard,
    an expert few of its tokens were routed to) weighs exactly its tokens, as in one process on the whole
    set (a mean of per-rank means would not). An expert is unrouted only if no rank routed a token to it.
    Every rank passes the same layers in the same order. One process: nothing to do, returns ``failed``."""
    if not is_distributed():
        return failed
    items = list(stats.values())
    device = items[0].device if items else torch.device("cpu")
    counts = torch.tensor([s.count for s in items] + [int(failed)], dtype=torch.int64, device=device)  # [n + 1]
    tensors = {"counts": counts}
    for name, s in stats.items():
        tensors |= {f"{name}.{key}": total for key, total in s.totals.items()}  # the float64 accumulators
    all_reduce_sum(tensors)
    for s, count in zip(items, counts[:-1].tolist()):
        s.count = int(count)
    return bool(counts[-1])


def attach_stats(layers: dict[str, nn.Module], device: torch.device, hessian: bool,
                 tokens: TokenMask | None = None):
    """Register forward hooks feeding an ``InputStats`` per layer; returns (stats, handles): ``stats`` is complete
    once every handle is removed. With ``tokens``, padded positions are left out. On one process, layers fed
    the very same input tensor share one ``InputStats`` (``_SharedInputs``); under torchrun each layer has its
    own, created up front, as the all-reduce needs the same tensors on every rank."""
    if is_distributed():
        stats = {name: InputStats(in_features(m), device, hessian) for name, m in layers.items()}
        handles = []
        for name, module in layers.items():
            def hook(_module, inputs, _output, s=stats[name]):
                x = inputs[0]
                s.add(tokens.select(x) if tokens is not None else x)
            handles.append(module.register_forward_hook(hook))
        return stats, handles
    shared = _SharedInputs(layers, device, hessian, tokens)
    handles = [module.register_forward_hook(lambda _m, inputs, _o, name=name: shared.feed(name, inputs[0]))
               for name, module in layers.items()]
    return shared.stats, [*handles, shared]


class _SharedInputs:
    """The statistics of one collection, where layers called one after another on the very same input tensor
    (q, k and v of an attention; gate and up of a gated MLP) accumulate one ``InputStats``: such an input's
    X^T X is computed and held once (a 2048 x 5504 Llama block's float64 Hessians: 343 MB instead of 443,
    at the peak of out-of-core pruning).

    A run of calls on one input is added when a call brings another input (or at ``remove``, the end of the
    collection). Layers that shared their statistics and are then called on different inputs (or not all
    of them) each continue from a copy of the shared sums, which are exactly their own history: every
    layer's sums are the same bits as with one ``InputStats`` per layer."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device, hessian: bool,
                 tokens: TokenMask | None) -> None:
        self.features = {name: in_features(m) for name, m in layers.items()}
        self.device, self.hessian, self.tokens = device, hessian, tokens
        self.stats: dict[str, InputStats] = {}
        self.open: tuple | None = None  # (input, its version, token mask, its real rows, [layers]), not yet added

    def feed(self, name: str, x: torch.Tensor) -> None:
        mask = self.tokens.current if self.tokens is not None else None
        held = self.open
        if held is not None and x is held[0] and x._version == held[1] and mask is held[2] and name not in held[4]:
            held[4].append(name)
            return
        self.flush()
        self.open = (x, x._version, mask, self.tokens.select(x) if self.tokens is not None else x, [name])

    def flush(self) -> None:
        if self.open is None:
            return
        rows, names = self.open[3], self.open[4]
        self.open = None
        for stats in self._accumulators(names):
            stats.add(rows)

    def _accumulators(self, names: list[str]) -> list[InputStats]:
        held = [self.stats.get(n) for n in names]
        if all(s is None for s in held):  # first call: one InputStats for the run of layers
            shared = InputStats(self.features[names[0]], self.device, self.hessian)
            shared.layers = len(names)
            self.stats.update(dict.fromkeys(names, shared))
            return [shared]
        if held[0] is not None and all(s is held[0] for s in held) and held[0].layers == len(names):
            return [held[0]]  # the same run of layers as before
        return [self._own(n) for n in names]

    def _own(self, name: str) -> InputStats:
        """``name``'s statistics, no longer shared with any other layer."""
        stats = self.stats.get(name)
        if stats is None:
            stats = InputStats(self.features[name], self.device, self.hessian)
        elif stats.layers > 1:
            stats.layers -= 1
            stats = stats.copy()
        self.stats[name] = stats
        return stats

    def remove(self) -> None:
        """The end of the collection (removed with the hooks): the last run is added, and layers never called get
        empty statistics, in the layers' order."""
        self.flush()
        ordered = {n: self.stats.get(n) or InputStats(f, self.device, self.hessian) for n, f in self.features.items()}
        others = {n: s for n, s in self.stats.items() if n not in self.features}  # e.g. expert slices' own
        self.stats.clear()
        self.stats.update(ordered | others)
