"""One-shot pruning of trained models from calibration data: SparseGPT, Wanda and magnitude,
unstructured or N:M, block by block for transformers. See ``prune_oneshot``."""
from .api import METHODS, LayerResult, OneshotStats, prune_oneshot, sparsegpt, wanda
from .solvers import magnitude_mask, sparsegpt_solve, wanda_mask

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "OneshotStats", "LayerResult", "METHODS",
           "magnitude_mask", "wanda_mask", "sparsegpt_solve"]
