"""``use_huge_pages``: the packed weights of a converted model moved into one huge-page arena
(``kernels.huge_pages``), where batch-1 decode streamed them 1.08-1.27x faster. ``to_inference`` calls it."""
from __future__ import annotations

from torch import nn

from ..kernels.huge_pages import move_to_huge_pages
from ..kernels.packed import PackedWeight
from .packed_modules import PackedLinear
from .siblings import SiblingLinear

__all__ = ["use_huge_pages"]


def _packed_weights(model: nn.Module) -> list[PackedWeight]:
    """Every PackedLinear's weight, and the combined weight of each sibling group (not a submodule)."""
    found: dict[int, PackedWeight] = {}
    for m in model.modules():
        layer = m._group.fused if isinstance(m, SiblingLinear) else m
        if isinstance(layer, PackedLinear) and isinstance(layer.packed, PackedWeight):
            found.setdefault(id(layer.packed), layer.packed)
    return list(found.values())


def use_huge_pages(model: nn.Module) -> int:
    """Move the packed weights of ``model``'s layers (in place) into memory backed by 2 MB pages; the bytes moved,
    0 where huge pages are unavailable (not Linux, ``SPARSETORCH_HUGE_PAGES=0``) or the weights are small.
    Weights that share memory (a sibling group's combined weight and its layers' views) keep sharing it."""
    weights = _packed_weights(model)
    buffers = [b for w in weights for b in w._buffers.values() if b is not None]
    moved = move_to_huge_pages(buffers)
    if moved is None:
        return 0
    for w in weights:
        for name, b in w._buffers.items():
            if b is not None:
                w._buffers[name] = moved[id(b)]  # kernels' cached addresses follow (storage_key changes)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in moved.values()}.values())
