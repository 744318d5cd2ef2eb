"""One-shot pruning of trained models from calibration data: magnitude, Wanda, RIA, SparseGPT and
ALPS, uniform or OWL sparsity, unstructured or N:M, DSnoT refinement and joint int8/int4
quantization, block by block for transformers (MoE experts included). See ``prune_oneshot``.

    import sparsetorch
    calib = [ids[i : i + 512][None] for i in range(0, 128 * 512, 512)]    # token-id tensors
    sparsetorch.sparsegpt(model, calib, sparsity=0.5)                    # or pattern="2:4"
    sparsetorch.wanda(model, calib, pattern="4:8")
    model.save_pretrained("pruned")                                      # an ordinary model

or from the shell: ``sparsetorch prune-lm MODEL_DIR --method sparsegpt --pattern 2:4 --calibration FILE --out DIR``.

Under torchrun, every rank passes its own shard (``shard_calibration(calib)``) and the statistics are
summed over the ranks: every rank ends with the same pruned model, that of one process on the whole set.
"""
from .api import METHODS, alps, prune_oneshot, ria, sparsegpt, wanda
from .calibration import shard_calibration
from .owl import OWL, outlier_ratio, owl_densities
from .results import LayerResult, OneshotStats
from .solvers import magnitude_mask, sparsegpt_solve, wanda_mask

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "ria", "alps", "OneshotStats", "LayerResult", "METHODS", "OWL",
           "shard_calibration", "magnitude_mask", "wanda_mask", "sparsegpt_solve", "outlier_ratio", "owl_densities"]
