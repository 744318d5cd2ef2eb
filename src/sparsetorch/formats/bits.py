"""Bit packing of bool masks (8 per byte, little-endian bit order, row-major)."""
from __future__ import annotations

import math

import numpy as np
import torch


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 tensor of ceil(numel/8) bytes."""
    flat = mask.detach().reshape(-1).cpu().numpy().astype(bool)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits`` for a tensor of ``shape``."""
    numel = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
