"""Fast sparse Linear kernels for CPU inference: Y = X @ W^T with W sparse [out, in].

* :func:`pack` turns a pruned dense weight into a :class:`CSRWeight`, :class:`NMWeight` or
  :class:`BSRWeight`; :func:`sparse_linear` multiplies with it.
* The compiled core (C++17, OpenMP, AVX-512 / AVX2 / portable chosen at run time) is optional:
  :func:`has_extension` says whether it is built and enabled; without it everything runs on torch's
  sparse CSR/BSR kernels (int32 indices). ``SPARSETORCH_DISABLE_EXT=1`` forces that fallback.
* :func:`sparsetorch.to_inference` picks, per layer, the fastest of these by measuring.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

# lazy: the edge runtime imports kernels.loader and must not pull torch in through this package
_LAZY = {
    "pack": "packed", "PackedWeight": "packed", "CSRWeight": "packed", "NMWeight": "packed", "BSRWeight": "packed",
    "index_bits": "packed", "sparse_linear": "sparse_matmul", "has_extension": "sparse_matmul",
    "extension_isa": "sparse_matmul",
}
_SUBMODULES = {"loader", "packed", "sparse_matmul", "microbench", "inference_ops", "training_ops"}

__all__ = [*_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)
