"""One-shot pruning of trained models from calibration data: magnitude, Wanda, RIA, SparseGPT and
ALPS, uniform or OWL sparsity, unstructured or N:M, DSnoT refinement and joint int8/int4
quantization, block by block for transformers (MoE experts included). See ``prune_oneshot``.

    import sparsetorch
    calib = [ids[i : i + 512][None] for i in range(0, 128 * 512, 512)]    # token-id tensors
    sparsetorch.sparsegpt(model, calib, sparsity=0.5)                    # or pattern="2:4"
    sparsetorch.wanda(model, calib, pattern="4:8")
    model.save_pretrained("pruned")                                      # an ordinary model

A model larger than memory is pruned from its checkpoint folder, one block at a time, into a new folder
that ``from_pretrained`` loads (see ``out_of_core``)::

    sparsetorch.prune_oneshot("llama/", calib, method="sparsegpt", sparsity=0.5, out="llama-pruned/")
    model = sparsetorch.oneshot.load_pruned("llama-pruned/")           # masks from the zeros

or from the shell: ``sparsetorch prune-lm MODEL_DIR --method sparsegpt --pattern 2:4 --calibration FILE --out DIR``.

Under torchrun, every rank passes its own shard (``shard_calibration(calib)``) and the statistics are
summed over the ranks: every rank ends with the same pruned model, that of one process on the whole set.
"""
from .api import METHODS, alps, prune_oneshot, ria, sparsegpt, wanda
from .calibration import shard_calibration
from .out_of_core import load_pruned
from .owl import OWL, outlier_ratio, owl_densities
from .results import LayerResult, OneshotStats
from .solvers import magnitude_mask, sparsegpt_solve, wanda_mask

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "ria", "alps", "OneshotStats", "LayerResult", "METHODS", "OWL",
           "shard_calibration", "magnitude_mask", "wanda_mask", "sparsegpt_solve", "outlier_ratio", "owl_densities",
           "load_pruned"]
