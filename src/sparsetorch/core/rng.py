"""The library's one rule for randomness: every random choice draws from an explicit ``torch.Generator``."""
from __future__ import annotations

import torch

DEFAULT_SEED = 0


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh one seeded with DEFAULT_SEED: without one, a run repeats exactly
    (the global generator would make masks depend on whatever drew from it before)."""
    return generator if generator is not None else torch.Generator().manual_seed(DEFAULT_SEED)
