"""Fast CPU inference for pruned models. ``convert`` holds ``to_inference`` (swaps sparse layers for
compiled kernels chosen per layer by measuring); ``packed_modules`` the layer modules it puts in place
(PackedLinear, PackedConv2d); ``kernel_choice`` the timing and the kernel cache; ``fusion`` FusedChain
and the pass that fuses chains of small layers into one native call."""
import warnings

from .convert import to_inference
from .fusion import FusedChain
from .kernel_choice import clear_kernel_cache
from .packed_modules import PackedConv2d, PackedLinear

__all__ = ["to_inference", "PackedLinear", "PackedConv2d", "clear_kernel_cache", "FusedChain"]

_RENAMED = {"SparseLinear": "PackedLinear", "SparseConv2d": "PackedConv2d"}


def __getattr__(name: str):
    # the old names clashed with the training sparsetorch.SparseLinear; kept importable for a while
    if name in _RENAMED:
        warnings.warn(f"sparsetorch.inference.{name} is deprecated; use {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
