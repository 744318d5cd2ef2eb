"""``sparse_linear`` over packed weights, and whether the compiled kernels are here (torch side)."""
from __future__ import annotations

import torch

from ..errors import SparsityError
from . import inference_ops
from .packed import PackedWeight

def has_extension() -> bool:
    """Whether the compiled kernels are built and enabled."""
    return inference_ops.available()


def extension_isa() -> str | None:
    """"avx512", "avx2" or "generic": the instruction set the compiled kernels use here (None if absent)."""
    return inference_ops.best_isa()


def sparse_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """``x @ W^T + bias`` for a packed W; x is [..., in] (any strides). backend: "auto", "ext" or "torch"."""
    if backend == "auto":
        backend = "ext" if has_extension() and x.device.type == "cpu" else "torch"
    if backend == "ext" and not has_extension():
        raise SparsityError("sparsetorch's compiled kernels are not available here (not built, or SPARSETORCH_DISABLE_EXT=1); "
                            "use backend='torch' or 'auto'")
    lead = x.shape[:-1]
    y = weight.linear(x.reshape(-1, x.shape[-1]), bias, backend)
    return y.reshape(*lead, weight.out_features).to(x.dtype)
