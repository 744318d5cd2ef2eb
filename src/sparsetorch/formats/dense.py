"""Dense: the tensor as it is (with an optional packed mask)."""
from __future__ import annotations

import torch

from .bits import pack_bits, unpack_bits
from .format_registry import Format, need, parse_dtype, parse_shape, register_format


def encode(tensor: torch.Tensor, mask: torch.Tensor | None):
    parts = {"values": tensor.detach().contiguous()}
    if mask is not None:
        parts["bitmask"] = pack_bits(mask)
    return parts, {"masked": mask is not None}


def decode(parts, meta):
    shape, dtype = parse_shape(meta.get("shape")), parse_dtype(meta.get("dtype"))
    numel = 1
    for s in shape:
        numel *= s
    values = need(parts, "values", numel, dtype).reshape(shape)
    mask = unpack_bits(need(parts, "bitmask", (numel + 7) // 8, torch.uint8), shape) if meta.get("masked") else None
    return values, mask


register_format(Format("dense", encode, decode, needs_mask=False))
