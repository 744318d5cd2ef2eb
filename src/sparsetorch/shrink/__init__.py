"""Structured shrinking: remove pruned channels, neurons and heads for a smaller dense model.

``shrink(model, example_inputs)`` returns the smaller copy; ``prune_channels`` chooses what to
remove (by L1/L2 norm, BatchNorm scale or Taylor importance, honouring residual groups);
``save_shrunk`` / ``load_shrunk`` store it as tensors plus shapes (no pickle).

Example::

    x = torch.randn(1, 3, 32, 32)
    sparsetorch.shrink.prune_channels(model, 0.5, example_inputs=x)   # or target_flops=0.5
    small = sparsetorch.shrink(model, x)                             # a smaller nn.Module, same outputs
    sparsetorch.shrink.save_shrunk(small, "small.safetensors")
    small = sparsetorch.shrink.load_shrunk("small.safetensors", lambda: ResNet())

Depth: ``remove_blocks(model, 0.25, calibration)`` drops the transformer blocks that matter least
(ShortGPT's Block Influence, or the loss rise when a block is skipped); the model keeps its class and
config, so ``from_pretrained`` loads it.
"""
from .block_removal import block_importance, remove_blocks
from .channel_selection import prune_channels
from .shrunk_files import load_shrunk, save_shrunk
from .surgery import find_groups, shrink

__all__ = ["shrink", "prune_channels", "find_groups", "save_shrunk", "load_shrunk", "block_importance", "remove_blocks"]

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``sparsetorch.shrink(model, x)`` calls :func:`shrink`; ``sparsetorch.shrink.prune_channels`` etc. still work."""

    __call__ = staticmethod(shrink)  # no wrapper frame: warnings point at the caller


_sys.modules[__name__].__class__ = _CallableModule
