"""sparsetorch: sparse neural networks in PyTorch, from finding the sparsity to cashing it in.

Three lines prune any model and keep it sparse::

    import sparsetorch
    sparsetorch.prune(model, 0.9)          # 90% global magnitude pruning, in place
    sparsetorch.save(model, "model.safetensors")

Submodules are imported on first use so that ``import sparsetorch`` stays fast.
"""
from __future__ import annotations

from ._lazy import lazy_attributes
from .errors import SparsityError, SparsityWarning

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved lazily by __getattr__. No module may share a name
# with a public function: importing the module would rebind the package attribute to it.
_LAZY = {
    "prune": "core.post_training:prune",
    "save": "formats.files:save",
    "load": "formats.files:load",
    "load_compressed_tensors": "formats.compressed_tensors:load_compressed_tensors",
    "report": "explain.layer_report:report",
    "Sparsifier": "sparsifiers.base:Sparsifier",
    "GMP": "sparsifiers:GMP",
    "Static": "sparsifiers:Static",
    "SET": "sparsifiers:SET",
    "RigL": "sparsifiers:RigL",
    "SRigL": "sparsifiers:SRigL",
    "SNIP": "sparsifiers:SNIP",
    "GraSP": "sparsifiers:GraSP",
    "SynFlow": "sparsifiers:SynFlow",
    "LotteryTicket": "sparsifiers:LotteryTicket",
    "set_mask": "core.masks:set_mask",
    "get_mask": "core.masks:get_mask",
    "iter_masks": "core.masks:iter_masks",
    "remove_masks": "core.masks:remove_masks",
    "to_inference": "inference.convert:to_inference",
    "save_training_state": "integrations.training_state:save_training_state",
    "load_training_state": "integrations.training_state:load_training_state",
    "wanda": "oneshot.api:wanda",
    "sparsegpt": "oneshot.api:sparsegpt",
    "ria": "oneshot.api:ria",
    "alps": "oneshot.api:alps",
    "prune_oneshot": "oneshot.api:prune_oneshot",
    "export_onnx": "export.onnx:export_onnx",
    "to_sparse_training": "sparse_training.layer_swap:to_sparse_training",
    "to_dense": "sparse_training.layer_swap:to_dense",
    "SparseLinear": "sparse_training.sparse_linear:SparseLinear",
    "sparse_param_groups": "sparse_training.optim:param_groups",
    "export_edge": "export.edge:export_edge",
    "distill": "recovery.loop:distill",
    "recover": "recipes.prune_and_recover:recover",
}
_SUBMODULES = {"core", "formats", "sparsifiers", "oneshot", "sparse_training", "kernels", "inference", "shrink",
               "export", "edge", "explain", "integrations", "recipes", "recovery", "models", "data", "cli", "testing"}

# Top-level names that moved to their namespace: still reachable here, with a DeprecationWarning.
_MOVED = {
    "lottery_ticket": "sparsifiers", "parse_pattern": "core.patterns", "CompressedSET": "sparsifiers",
    "CompressedRigL": "sparsifiers", "CompressedSRigL": "sparsifiers",
}

__all__ = ["SparsityError", "SparsityWarning", "__version__", *_LAZY]

_lazy_getattr, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"sparsetorch.{name} is deprecated; use sparsetorch.{_MOVED[name]}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(f".{_MOVED[name]}", __name__), name)
    return _lazy_getattr(name)
