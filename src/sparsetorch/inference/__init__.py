"""Fast CPU inference for pruned models: ``to_inference`` swaps layers for compiled kernels chosen by measuring.

* ``convert``: ``to_inference``, the entry point (structure detection, per-layer candidates).
* ``packed_modules``: the layer modules it puts in place (PackedLinear, PackedConv2d, SparsifiedInputLinear).
* ``activation_sparsity``: TEAL thresholds per Linear input (calibrate, attach in torch, state_dict).
* ``kernel_choice``: timing candidates, checking they agree, and the per-process kernel cache.
* ``compiled_decode``: ``compile_decode``, torch.compile of a converted model's decode step (``compile=True``).
* ``arena``: ``use_huge_pages``, the packed weights moved into 2 MB pages (``to_inference`` does it).
* ``fused_chain``: FusedChain, a run of small layers in one native call.
* ``chain_discovery`` -> ``chain_rewrite`` -> ``chain_decision``: find chains, build fused copies, keep the
  faster (the fusion pass ``to_inference`` runs last).
"""
import warnings

from .activation_sparsity import ActivationSparsity, calibrate_activation_sparsity
from .arena import use_huge_pages
from .compiled_decode import compile_decode
from .convert import to_inference
from .fused_chain import FusedChain
from .kernel_choice import clear_kernel_cache
from .packed_modules import PackedConv2d, PackedLinear, SparsifiedInputLinear

__all__ = ["to_inference", "PackedLinear", "PackedConv2d", "SparsifiedInputLinear", "clear_kernel_cache", "FusedChain",
           "calibrate_activation_sparsity", "ActivationSparsity", "compile_decode", "use_huge_pages"]

_RENAMED = {"SparseLinear": "PackedLinear", "SparseConv2d": "PackedConv2d"}


def __getattr__(name: str):
    # the old names clashed with the training sparsetorch.SparseLinear; kept importable for a while
    if name in _RENAMED:
        warnings.warn(f"sparsetorch.inference.{name} is deprecated; use {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
