"""``prune_oneshot``: prune a trained model in one shot from a little calibration data.

A run is a composition: a method (a score such as magnitude, Wanda or RIA, or a layer-wise solver
such as SparseGPT or ALPS), a layer-wise density distribution (uniform or OWL), a pattern
(unstructured or N:M), then optionally a refinement (DSnoT) and a quantization grid. Transformers
are processed block by block, anything else in one pass (see ``drivers``).
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from ..core.patterns import Pattern
from ..core.distributed import any_rank, is_distributed
from .blocks import blocks_chain, find_blocks
from .drivers import forward_error, run_one_pass, run_sequential
from .experts import install_expert_masks, layer_module
from .owl import OWL
from .out_of_core import prune_checkpoint
from .planning import (DISTRIBUTIONS, METHODS, REFINEMENTS, SparsitySpec, peak_memory,  # noqa: F401 - the CLI's
                       on_every_rank, plan_job, skip_to_exclude)
from .results import LayerResult, OneshotStats

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "ria", "alps", "OneshotStats", "LayerResult", "METHODS", "OWL"]


def prune_oneshot(
    model: nn.Module | str | os.PathLike,
    calibration: Iterable[Any] | None,
    *,
    method: str = "sparsegpt",
    sparsity: SparsitySpec = 0.5,
    pattern: str | Pattern = "unstructured",
    distribution: str | OWL = "uniform",
    permute: bool = False,
    refine: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    include: str | type | Iterable[str | type] | None = None,
    exclude: str | type | Iterable[str | type] | None = None,
    skip: str | Iterable[str] | None = None,
    scope: str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    keep_head: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    return_stats: bool | None = None,
    out: str | os.PathLike | None = None,
    activations: str = "memory",
    activation_dtype: torch.dtype | None = None,
) -> nn.Module | OneshotStats:
    """Prune ``model``'s Linear layers in place from ``calibration`` and return the model.

    Args:
        calibration: an iterable of model inputs: token-id tensors ``[seq]`` or ``[batch, seq]``,
            dicts of them (``{"input_ids": ..., "attention_mask": ...}``: padded positions never enter
            the statistics), or for a plain module any tensor/tuple it takes. Not needed for
            ``method="magnitude"``.
        method: "sparsegpt" (OBS weight updates), "alps" (ADMM + conjugate gradients on the same
            layer-wise problem, Meng et al. 2024: stronger at high sparsity), "wanda" (|W| * ||X||),
            "ria" (relative importance times ||X||^0.5, Zhang et al. 2024) or "magnitude" (|W|).
        sparsity: fraction removed per layer, or a dict of name globs to sparsities, e.g.
            ``{"attn": 0.4, "mlp": 0.6}`` (a key without ``*?[`` matches as a substring; the first
            matching key wins; every pruned layer must match one). N:M patterns fix it at 1 - N/M.
        pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8"); N:M groups run along the inputs.
        distribution: how the sparsity is spread over the layers: "uniform" (every layer at
            ``sparsity``) or "owl" (OWL: blocks with more outlier activations keep more weights, the
            mean stays at ``sparsity``; ``OWL(m=5, lam=0.08)`` sets its threshold and spread).
            Unstructured patterns and one ``sparsity`` value only.
        permute: with ``method="ria"`` and an N:M pattern, choose each layer's groups after RIA's
            input-channel permutation (large weights spread over different groups). Weights are not
            moved: the mask is N:M along the recorded order (``core.masks.get_input_order``), so the
            model computes exactly what the masked dense model computes.
        refine: "dsnot" refines the method's mask without training (DSnoT, Zhang et al. 2024): per row,
            swap a pruned weight back in (at its dense value) for a kept one, proposed by the paper's
            rules and taken only if it lowers the layer's exact reconstruction error. Any method, any pattern.
        bits, group_size: quantize the kept weights onto a symmetric int8 (``bits=8``) or int4 grid with one
            scale per output row and ``group_size`` inputs (None: per row). SparseGPT chooses the mask and
            the quantization in the same pass (GPTQ error feedback); other methods prune, then round to
            nearest. The grid is remembered on each layer, so ``sparsetorch.save(model, path,
            values="grid")`` stores the integer codes exactly (int4: two per byte).
        include, exclude: which Linear layers to prune, with the same rule as ``sparsetorch.prune``:
            module types or full-name globs (``"*attn*"``, ``"blocks.*.fc1"``). By default every
            Linear layer except the final classifier/lm_head; naming the head in ``include``
            prunes it. Embeddings are not Linear and are never pruned. Mixture-of-experts layers whose
            experts are fused 3-D parameters (transformers 5.x) are pruned one expert at a time, each named
            like ``"model.layers.0.mlp.experts.gate_up_proj[3]"`` (``exclude="*experts*"`` skips them);
            their routers stay dense unless ``include`` names them (see ``oneshot.experts``).
        skip, keep_head: deprecated; ``skip=["attn"]`` is ``exclude=["*attn*"]`` and
            ``keep_head=False`` is ``include=["*"]`` (or list the head by name).
        scope: where weights compete: "layer" or "row" (per output row). Defaults: magnitude
            "layer", wanda "row"; SparseGPT always chooses adaptively per column block.
        block_size, damp: SparseGPT's column block width and Hessian damping (fraction of mean diag).
        device: where the math runs, default CUDA when available; blocks are moved there one at a
            time and back. Statistics are float32 whatever the model's dtype.
        progress: a tqdm bar per block (None: only on a terminal).
        return_stats: deprecated; the ``OneshotStats`` (per-layer results, seconds, peak memory) is
            always attached as ``model.sparsetorch_stats``. ``True`` still returns ``(model, stats)``.

        out, activations, activation_dtype: out-of-core pruning, when ``model`` is a checkpoint folder (Hugging
            Face ``config.json`` + safetensors shards) instead of a model: the pruned checkpoint is written to the
            folder ``out``, one block at a time, and the run's ``OneshotStats`` is returned (see
            ``oneshot.out_of_core``). ``activations="disk"`` spills the calibration activations to ``out``
            instead of holding them in memory; ``activation_dtype=torch.float16`` (or bfloat16) holds them in
            half precision.

    Under torchrun (torch.distributed initialised, several processes), each rank passes its own shard of
    the calibration set (``shard_calibration``) and the same model: every statistic (input norms, Hessians,
    OWL's outlier scores, per-expert token counts) is summed over the ranks before it is used, so every rank
    ends with the same masks and weights, those of one process on the whole set (see docs/oneshot.md).
    Works with gloo (CPU) and NCCL (call ``torch.cuda.set_device(local_rank)`` first).

    Results are installed as sparsetorch masks, so the model stays sparse when fine-tuned. A layer
    that no calibration token reaches (an MoE expert nothing was routed to) is pruned by magnitude,
    with a warning and a note in its ``LayerResult``. Nothing is changed if an argument or the
    calibration data is invalid.
    """
    started = time.perf_counter()
    options = dict(method=method, sparsity=sparsity, pattern=pattern, distribution=distribution, permute=permute,
                   refine=refine, bits=bits, group_size=group_size, include=include, exclude=exclude, skip=skip,
                   scope=scope, block_size=block_size, damp=damp, keep_head=keep_head, device=device,
                   progress=progress)
    if isinstance(model, (str, os.PathLike)):
        return prune_checkpoint(model, calibration, out, options=options, activations=activations,
                                activation_dtype=activation_dtype)
    if out is not None or activations != "memory" or activation_dtype is not None:
        raise SparsityError("out=, activations= and activation_dtype= apply to a checkpoint folder (out-of-core "
                            "pruning); for a model in memory, prune it and call model.save_pretrained(DIR)")
    job = plan_job(model, calibration, **options)
    compute = job.pruner.device
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    targets, densities, calib = job.targets, job.densities, job.calibration
    needs_data = calib is not None
    was_training = model.training
    model.eval()
    try:
        if not needs_data:
            stats = job.stats_for("weights-only")
            for name, module in targets.items():
                stats.layers.append(job.pruner.prune(name, module, None, densities[name]))
            install_expert_masks(targets)
        else:
            found = find_blocks(model)
            sequential = found is not None and on_every_rank(_sequential_ok, model, found[1], calib, targets)
            if found is not None and is_distributed():  # each rank checked its own first item: all run one way
                sequential = not any_rank(not sequential)
            if sequential:
                stats = run_sequential(job, found[1])
            else:
                stats = run_one_pass(job)
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - started
    stats.peak_memory_mb, stats.memory_kind = peak_memory(compute)
    model.sparsetorch_stats = stats
    if return_stats is not None:
        warnings.warn("prune_oneshot(return_stats=...) is deprecated; it always returns the model, read "
                      "model.sparsetorch_stats for the stats", DeprecationWarning, stacklevel=2)
    return (model, stats) if return_stats else model


def ria(model: nn.Module, calibration: Iterable[Any], sparsity: SparsitySpec = 0.5,
        pattern: str | Pattern = "unstructured", permute: bool = False, **kwargs):
    """RIA (Zhang et al. 2024): keep the weights with the largest relative importance x ||X||^0.5;
    ``permute=True`` adds its channel permutation for N:M. See ``prune_oneshot``."""
    return prune_oneshot(model, calibration, method="ria", sparsity=sparsity, pattern=pattern, permute=permute,
                         **kwargs)


def alps(model: nn.Module, calibration: Iterable[Any], sparsity: SparsitySpec = 0.5,
         pattern: str | Pattern = "unstructured", **kwargs):
    """ALPS (Meng et al. 2024): the layer-wise reconstruction problem solved by ADMM with a growing
    penalty, then conjugate gradients on the final support. See ``prune_oneshot``."""
    return prune_oneshot(model, calibration, method="alps", sparsity=sparsity, pattern=pattern, **kwargs)


def wanda(model: nn.Module, calibration: Iterable[Any], sparsity: SparsitySpec = 0.5,
          pattern: str | Pattern = "unstructured", **kwargs):
    """Wanda (Sun et al. 2023): keep the weights with the largest |W| * ||X||_2 in each output row.
    See ``prune_oneshot`` for the options."""
    return prune_oneshot(model, calibration, method="wanda", sparsity=sparsity, pattern=pattern, **kwargs)


def sparsegpt(model: nn.Module, calibration: Iterable[Any], sparsity: SparsitySpec = 0.5,
              pattern: str | Pattern = "unstructured", block_size: int = 128, damp: float = 0.01, **kwargs):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight updates from the inverse
    Hessian of each layer's inputs. See ``prune_oneshot`` for the options."""
    return prune_oneshot(model, calibration, method="sparsegpt", sparsity=sparsity, pattern=pattern,
                         block_size=block_size, damp=damp, **kwargs)


def _sequential_ok(model, blocks, calib, targets) -> bool:
    """Block-by-block processing applies if the blocks hold the targets and chain exactly."""
    inside = {id(m) for b in blocks for m in b.modules()}
    if not any(id(layer_module(m)) in inside for m in targets.values()):
        return False
    try:
        return blocks_chain(model, blocks, calib.run, calib.samples[0])
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is a data error
        raise forward_error(exc) from exc
