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

Width and experts (transformers Llama / Mistral / Qwen2 / Qwen3, their MoE variants, GPT-2; sparsetorch's byte GPT
for width), scored by activations on calibration data (Minitron; REAP for experts)::

    remove_heads(model, 0.25, calib)              # key/value groups, or unit="query" for query heads per group
    remove_mlp_channels(model, 0.25, calib)       # compensate=True: FLAP bias compensation
    remove_hidden(model, 0.25, calib)             # the hidden size, through every norm and projection
    remove_experts(moe_model, 0.5, calib)         # whole experts and their router rows
    save_pretrained(model, "small/")              # plain transformers folder when the config can say it all,
    model = from_pretrained("small/")             # else one with the recorded shapes, loaded here
"""
from .block_removal import block_importance, remove_blocks
from .channel_selection import prune_channels
from .shrunk_files import load_shrunk, save_shrunk
from .expert_removal import expert_saliency, remove_experts
from .hf_folders import from_pretrained, save_pretrained
from .surgery import find_groups, shrink
from .width_pruning import remove_heads, remove_hidden, remove_mlp_channels
from .width_scores import WidthScores, width_importance

__all__ = ["shrink", "prune_channels", "find_groups", "save_shrunk", "load_shrunk", "block_importance", "remove_blocks",
           "width_importance", "WidthScores", "remove_heads", "remove_mlp_channels", "remove_hidden", "remove_experts",
           "expert_saliency", "save_pretrained", "from_pretrained"]

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``sparsetorch.shrink(model, x)`` calls :func:`shrink`; ``sparsetorch.shrink.prune_channels`` etc. still work."""

    __call__ = staticmethod(shrink)  # no wrapper frame: warnings point at the caller


_sys.modules[__name__].__class__ = _CallableModule
