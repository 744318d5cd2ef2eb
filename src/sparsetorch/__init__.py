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
    "prune": "pruning:prune",
    "save": "io:save",
    "load": "io:load",
    "report": "reporting:report",
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
    "lottery_ticket": "sparsifiers:lottery_ticket",
    "set_mask": "masks:set_mask",
    "get_mask": "masks:get_mask",
    "iter_masks": "masks:iter_masks",
    "remove_masks": "masks:remove_masks",
    "parse_pattern": "patterns:parse_pattern",
    "to_inference": "inference:to_inference",
    "save_training_state": "integrations.state:save_training_state",
    "load_training_state": "integrations.state:load_training_state",
    "wanda": "oneshot.api:wanda",
    "sparsegpt": "oneshot.api:sparsegpt",
    "prune_oneshot": "oneshot.api:prune_oneshot",
    "export_onnx": "export.onnx_export:export_onnx",
    "to_sparse_training": "sparse_training.convert:to_sparse_training",
    "to_dense": "sparse_training.convert:to_dense",
    "SparseLinear": "sparse_training.layer:SparseLinear",
    "CompressedSET": "sparse_training.dynamic:CompressedSET",
    "CompressedRigL": "sparse_training.dynamic:CompressedRigL",
    "CompressedSRigL": "sparse_training.dynamic:CompressedSRigL",
    "sparse_param_groups": "sparse_training.optim:param_groups",
    "export_edge": "edge_export:export_edge",
}
_SUBMODULES = {"masks", "patterns", "distributions", "scores", "schedules", "selection", "formats", "sparsifiers",
               "oneshot", "kernels", "explain", "integrations", "edge", "cli", "io",
               "shrink"}  # a callable module: sparsetorch.shrink(model, x) and sparsetorch.shrink.prune_channels

__all__ = ["SparsityError", "SparsityWarning", "__version__", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)
