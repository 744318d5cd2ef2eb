"""torch.distributed helpers shared by the sparsifiers and the compressed layers (no sparsetorch imports)."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed"]


def is_distributed() -> bool:
    """True inside a torch.distributed run of more than one process (DDP): ranks must agree."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
