"""Fast sparse Linear kernels for CPU inference: Y = X @ W^T with W sparse [out, in].

* :func:`pack` turns a pruned dense weight into a :class:`CSRWeight`, :class:`NMWeight` or
  :class:`BSRWeight`; :func:`sparse_linear` multiplies with it.
* The compiled core (C++17, OpenMP, AVX-512 / AVX2 / portable chosen at run time) is optional:
  :func:`has_extension` says whether it is built and enabled; without it everything runs on torch's
  sparse CSR/BSR kernels (int32 indices). ``SPARSETORCH_DISABLE_EXT=1`` forces that fallback.
* :func:`sparsetorch.to_inference` picks, per layer, the fastest of these by measuring.
"""
from __future__ import annotations

import torch

from . import _ext
from .packed import BSRWeight, CSRWeight, NMWeight, PackedWeight, index_bits, pack

__all__ = ["pack", "sparse_linear", "has_extension", "extension_isa", "PackedWeight", "CSRWeight", "NMWeight",
           "BSRWeight", "index_bits"]


def has_extension() -> bool:
    """Whether the compiled kernels are built and enabled."""
    return _ext.available()


def extension_isa() -> str | None:
    """"avx512", "avx2" or "generic": the instruction set the compiled kernels use here (None if absent)."""
    return _ext.best_isa()


def sparse_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """``x @ W^T + bias`` for a packed W; x is [..., in] (any strides). backend: "auto", "ext" or "torch"."""
    if backend == "auto":
        backend = "ext" if has_extension() and x.device.type == "cpu" else "torch"
    if backend == "ext" and not has_extension():
        raise RuntimeError("sparsetorch's compiled kernels are not available; use backend='torch'")
    lead = x.shape[:-1]
    y = weight.linear(x.reshape(-1, x.shape[-1]), bias, backend)
    return y.reshape(*lead, weight.out_features).to(x.dtype)
