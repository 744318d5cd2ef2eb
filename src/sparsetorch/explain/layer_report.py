"""``sparsetorch.report``: per-layer parameters, nonzeros, FLOPs and bytes, dense vs sparse."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..core.masks import get_mask
from ..core.layer_selection import DEFAULT_TYPES

__all__ = ["report", "Report", "LayerRow"]


@dataclass
class LayerRow:
    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    dense_flops: int | None = None  # per sample, 2 per multiply-accumulate
    sparse_flops: int | None = None
    dense_bytes: int = 0
    sparse_bytes: int = 0  # bitmask + kept values, the default file encoding

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["sparsity"] = self.sparsity
        return out


@dataclass
class Report:
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def total(self) -> LayerRow:
        def add(attr):
            values = [getattr(r, attr) for r in self.rows]
            return None if any(v is None for v in values) else sum(values)

        return LayerRow("total", "", (), add("params"), add("nonzeros"), add("dense_flops"), add("sparse_flops"),
                        add("dense_bytes"), add("sparse_bytes"))

    @property
    def sparsity(self) -> float:
        return self.total.sparsity

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self.rows] + [self.total.to_dict()]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dicts(), **kwargs)

    def __str__(self) -> str:
        head = ["layer", "shape", "params", "nonzeros", "sparsity", "MFLOPs dense", "MFLOPs sparse", "KB dense", "KB sparse"]
        lines = [head]
        for r in self.rows + [self.total]:
            mf = lambda v: "-" if v is None else f"{v / 1e6:.3f}"
            lines.append([r.name, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.nonzeros:,}",
                          f"{r.sparsity:.1%}", mf(r.dense_flops), mf(r.sparse_flops),
                          f"{r.dense_bytes / 1024:.1f}", f"{r.sparse_bytes / 1024:.1f}"])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, lines[1:-1]), rule, fmt(lines[-1])])

    __repr__ = __str__


def _positions(module: nn.Module, out: torch.Tensor) -> int:
    """How many times per sample the layer's weight is applied (tokens or output pixels)."""
    if isinstance(module, nn.Linear):
        return math.prod(out.shape[1:-1]) if out.dim() > 2 else 1
    return math.prod(out.shape[2:])


@torch.no_grad()
def report(model: nn.Module, example_inputs: object = None) -> Report:
    """Per-layer report of every Linear/Conv layer (and any masked parameter) of ``model``.

    With ``example_inputs`` (a tensor or tuple, batch first) the model is run once to learn how
    often each weight is applied, giving FLOPs per sample; without, FLOPs are left out.
    """
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, DEFAULT_TYPES) or get_mask(m) is not None]
    positions: dict[str, int] = {}
    if example_inputs is not None:
        handles = [m.register_forward_hook(lambda mod, inp, out, n=n: positions.__setitem__(n, _positions(mod, out)))
                   for n, m in layers]
        was_training = model.training
        model.eval()
        try:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            model(*args)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    rows = []
    for name, m in layers:
        w = m.weight.detach()
        mask = get_mask(m)
        nonzeros = int(mask.sum()) if mask is not None else int((w != 0).sum())
        pos = positions.get(name)
        dense_flops = None if pos is None else 2 * w.numel() * pos
        sparse_flops = None if pos is None else 2 * nonzeros * pos
        item = w.element_size()
        sparse_bytes = min(w.numel() * item, nonzeros * item + (w.numel() + 7) // 8)
        rows.append(LayerRow(name, type(m).__name__, tuple(w.shape), w.numel(), nonzeros,
                             dense_flops, sparse_flops, w.numel() * item, sparse_bytes))
    return Report(rows)
