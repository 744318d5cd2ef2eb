"""Sparse training on compressed weights: the dense weight matrix never exists.

* :class:`SparseLinear` stores W as CSR (values are the parameter, nnz of them) and computes the forward,
  the input gradient and the weight gradient (at kept positions only) with sparse kernels.
* :func:`to_sparse_training` / :func:`to_dense` swap a model's Linear layers in and out;
  :func:`param_groups` gives each sparse layer the learning rate its kept fan-in calls for.
* :class:`CompressedSET` and :class:`CompressedRigL` (Sparsifiers, like SET/RigL) move connections at fixed nnz,
  on the compressed layers, carrying Adam/SGD state along.
"""
from __future__ import annotations

from .layer_swap import broadcast_connectivity, hide_indices_from_ddp, to_dense, to_sparse_training
from .sparse_linear import SparseLinear
from .optim import param_groups
from .._lazy import lazy_attributes

# the compressed sparsifiers live with the other sparsifiers; reachable here too, imported on use
__getattr__, __dir__ = lazy_attributes(__name__, {name: "..sparsifiers.compressed" for name in
                                                  ("CompressedDST", "CompressedSET", "CompressedRigL", "CompressedSRigL")})

__all__ = ["SparseLinear", "to_sparse_training", "to_dense", "has_kernels", "CompressedDST", "CompressedSET",
           "CompressedRigL", "CompressedSRigL", "param_groups", "hide_indices_from_ddp", "broadcast_connectivity"]


def has_kernels() -> bool:
    """Whether the compiled training kernels (sparsetorch.kernels._train) are built and enabled."""
    from ..kernels import training_ops

    return training_ops.available()
