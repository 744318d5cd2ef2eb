"""Fast CPU inference for pruned models: ``to_inference`` swaps layers for compiled sparse kernels,
chosen per layer by measuring, and fuses chains of small layers into one native call."""
from .convert import SparseConv2d, SparseLinear, clear_kernel_cache, to_inference

__all__ = ["to_inference", "SparseLinear", "SparseConv2d", "clear_kernel_cache"]
