"""``prune_oneshot``: prune a trained model in one shot from a little calibration data.

A run is a composition: a method (a score such as magnitude, Wanda or RIA, or a layer-wise solver
such as SparseGPT or ALPS), a layer-wise density distribution (uniform or OWL), a pattern
(unstructured or N:M), then optionally a refinement (DSnoT) and a quantization grid. Transformers
are processed block by block, anything else in one pass (see ``drivers``).
"""
from __future__ import annotations

import fnmatch
import math
import resource
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError, check_sparsity
from ..core.patterns import Pattern, check_pattern_fits, parse_pattern
from ..core.post_training import resolve_density
from ..core.layer_selection import as_spec_list, final_classifier
from ..core.distributed import any_rank, disagreeing, is_distributed
from .blocks import blocks_chain, find_blocks
from .calibration import prepare_calibration
from .drivers import Job, forward_error, run_one_pass, run_sequential
from .experts import (ExpertSlice, check_experts_understood, install_expert_masks, layer_matches, layer_module,
                      prunable_layers, router_names)
from .layer_pruner import METHOD_NEEDS, LayerPruner, Recipe
from .linear_layers import weight_2d
from .owl import OWL
from .quantize import QuantGrid
from .results import LayerResult, OneshotStats

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "ria", "alps", "OneshotStats", "LayerResult", "METHODS", "OWL"]

METHODS = tuple(METHOD_NEEDS)
DISTRIBUTIONS = ("uniform", "owl")
REFINEMENTS = (None, "dsnot")
SparsitySpec = float | Mapping[str, float] | None


def prune_oneshot(
    model: nn.Module,
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
) -> nn.Module:
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

    Under torchrun (torch.distributed initialised, several processes), each rank passes its own shard of
    the calibration set (``shard_calibration``) and the same model: every statistic (input norms, Hessians,
    OWL's outlier scores, per-expert token counts) is summed over the ranks before it is used, so every rank
    ends with the same masks and weights, those of one process on the whole set up to the order of the
    float additions (see docs/oneshot.md). Works with gloo (CPU) and NCCL (call
    ``torch.cuda.set_device(local_rank)`` first).

    Results are installed as sparsetorch masks, so the model stays sparse when fine-tuned. A layer
    that no calibration token reaches (an MoE expert nothing was routed to) is pruned by magnitude,
    with a warning and a note in its ``LayerResult``. Nothing is changed if an argument or the
    calibration data is invalid.
    """
    started = time.perf_counter()
    recipe = _check_args(model, method, pattern, scope, block_size, damp, permute, bits, group_size, refine)
    owl = _check_distribution(distribution, recipe.pattern, sparsity)
    compute = _resolve_device(device)
    include, exclude = _legacy_selection(include, exclude, skip, keep_head)
    targets = _select(model, include, exclude)
    densities = _densities(targets, sparsity, recipe.pattern)
    for name, module in targets.items():
        check_pattern_fits(weight_2d(module).shape, recipe.pattern, name)
        if not torch.isfinite(module.weight.detach()).all():
            raise SparsityError(f"{name} contains NaN or inf; fix the weights before pruning", layer=name)
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    needs_data = recipe.needs_data or owl is not None
    if needs_data and is_distributed():
        _check_same_model(targets)
    calib = _on_every_rank(prepare_calibration, model, calibration) if needs_data else None
    job = Job(model, targets, calib, LayerPruner(recipe, compute), densities, owl, progress)
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
            sequential = found is not None and _on_every_rank(_sequential_ok, model, found[1], calib, targets)
            if found is not None and is_distributed():  # each rank checked its own first item: all run one way
                sequential = not any_rank(not sequential)
            if sequential:
                stats = run_sequential(job, found[1])
            else:
                stats = run_one_pass(job)
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - started
    stats.peak_memory_mb, stats.memory_kind = _peak_memory(compute)
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


# --- validation (everything is checked before the model is touched) ---------------------------------

def _check_args(model, method, pattern, scope, block_size, damp, permute, bits, group_size, refine) -> Recipe:
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise SparsityError(f"unknown method {method!r}; choose one of {list(METHODS)}", method=method)
    pat = parse_pattern(pattern)
    if pat.kind not in ("unstructured", "nm"):
        raise SparsityError(f"one-shot pruning supports 'unstructured' and 'N:M' patterns, got '{pat}'",
                            pattern=str(pat))
    if scope not in (None, "layer", "row"):
        raise SparsityError(f"unknown scope {scope!r}; use 'layer', 'row' or None (the method's default)",
                            scope=scope)
    if not isinstance(block_size, int) or block_size < 1:
        raise SparsityError(f"block_size must be a positive integer, got {block_size!r}", block_size=block_size)
    if not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise SparsityError(f"damp must be a finite number >= 0 (e.g. 0.01), got {damp!r}", damp=damp)
    if permute and (method != "ria" or pat.kind != "nm"):
        raise SparsityError(f"permute=True is RIA's channel permutation for N:M patterns; use method='ria' with "
                            f"pattern='2:4' (or another N:M), got method={method!r}, pattern='{pat}'", permute=permute)
    grid = None
    if bits is not None:
        grid = QuantGrid(bits, group_size)
        wrong = {str(p.dtype) for p in model.parameters() if p.dim() == 2 and p.dtype != torch.float32}
        if wrong:
            raise SparsityError(f"bits={bits} puts the kept weights exactly on an int{bits} grid, which needs float32 "
                                f"weights; the model has {sorted(wrong)} (load it with torch_dtype=torch.float32)",
                                bits=bits)
    elif group_size is not None:
        raise SparsityError("group_size applies to quantization; pass bits=8 or bits=4 with it", group_size=group_size)
    if refine not in REFINEMENTS:
        raise SparsityError(f"unknown refine {refine!r}; choose one of {list(REFINEMENTS)}", refine=refine)
    return Recipe(method, pat, scope, block_size, float(damp), bool(permute), grid, refine)


def _check_distribution(distribution, pat: Pattern, sparsity) -> OWL | None:
    """None for uniform, the OWL settings for OWL."""
    if isinstance(distribution, OWL):
        owl = distribution
    elif distribution in DISTRIBUTIONS:
        owl = OWL() if distribution == "owl" else None
    else:
        raise SparsityError(f"unknown distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)} "
                            "(or pass sparsetorch.oneshot.OWL(m=..., lam=...))", distribution=distribution)
    if owl is not None and pat.kind != "unstructured":
        raise SparsityError(f"distribution='owl' varies the sparsity per block, which a fixed {pat} pattern cannot; "
                            "use pattern='unstructured' or distribution='uniform'", pattern=str(pat))
    if owl is not None and isinstance(sparsity, Mapping):
        raise SparsityError("distribution='owl' sets each block's sparsity around one target; pass sparsity as one "
                            "number, not a dict", distribution="owl")
    return owl


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SparsityError(f"bad device {device!r}: {exc}", device=device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparsityError("device='cuda' but CUDA is not available; pass device='cpu' or None", device=device)
    return dev


def _glob_match(name: str, key: str) -> bool:
    """Keys of a ``sparsity`` dict: a key without ``*?[`` matches as a substring."""
    if any(c in key for c in "*?["):
        return fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(f"{name}.weight", key)
    return key in name


def skip_to_exclude(skip) -> list[str]:
    """The ``exclude=`` globs equivalent to an old ``skip=`` (a key without a wildcard was a substring)."""
    globs = [skip] if isinstance(skip, str) else list(skip)
    return [g if any(c in g for c in "*?[") else f"*{g}*" for g in globs]


def _legacy_selection(include, exclude, skip, keep_head):
    """Map the deprecated ``skip=``/``keep_head=`` onto ``include=``/``exclude=``, with a warning."""
    if skip is not None:
        new = skip_to_exclude(skip)
        warnings.warn(f"prune_oneshot(skip=...) is deprecated; use exclude={new}", DeprecationWarning, stacklevel=3)
        exclude = as_spec_list(exclude) + new
    if keep_head is not None:
        warnings.warn("prune_oneshot(keep_head=...) is deprecated; the head is kept dense by default, "
                      "include it explicitly with include=['*'] or its name", DeprecationWarning, stacklevel=3)
        if keep_head is False and include is None:
            include = ["*"]
    return include, exclude


def _select(model: nn.Module, include, exclude) -> dict[str, nn.Module]:
    """Linear-like layers (and MoE experts, one target per expert) to prune, in module order, chosen as
    ``sparsetorch.prune`` does; the head and MoE routers stay dense unless ``include`` names them."""
    linears = prunable_layers(model)
    if not linears:
        raise SparsityError(f"{type(model).__name__} has no Linear layer to prune; one-shot pruning works on "
                            "nn.Linear (and transformers Conv1D) layers")
    includes, excludes = as_spec_list(include), as_spec_list(exclude)
    for spec in includes:
        if not any(layer_matches(n, m, [spec]) for n, m in linears):
            raise SparsityError(f"include pattern {spec!r} matches no Linear layer; layers are named like "
                                f"{[n for n, _ in linears[:5]]}", include=spec)
    if includes:
        chosen = [(n, m) for n, m in linears if layer_matches(n, m, includes)]
    else:
        dense = {final_classifier(model, [(n, m) for n, m in linears if not isinstance(m, ExpertSlice)])}
        dense |= router_names(model)
        chosen = [(n, m) for n, m in linears if n not in dense]
    chosen = {n: m for n, m in chosen if not layer_matches(n, m, excludes)}
    check_experts_understood(model, includes, excludes)
    if not chosen:
        raise SparsityError(f"no layer left to prune after include={includes} and exclude={excludes}; "
                            f"layers are named like {[n for n, _ in linears[:5]]}", exclude=excludes)
    return chosen


def _densities(targets: dict[str, nn.Module], sparsity: SparsitySpec, pat: Pattern) -> dict[str, float]:
    if not isinstance(sparsity, Mapping):
        density = resolve_density(sparsity, pat)
        return dict.fromkeys(targets, density)
    for key, value in sparsity.items():
        check_sparsity(value, f"sparsity[{key!r}]")
    out = {}
    for name in targets:
        key = next((k for k in sparsity if _glob_match(name, k)), None)
        if key is None:
            raise SparsityError(f"layer {name} matches no key of sparsity={dict(sparsity)}; add a key for it "
                                "(e.g. '*': 0.5 as a catch-all) or leave it out with exclude=[...]", layer=name)
        out[name] = resolve_density(sparsity[key], pat)
    return out


def _sequential_ok(model, blocks, calib, targets) -> bool:
    """Block-by-block processing applies if the blocks hold the targets and chain exactly."""
    inside = {id(m) for b in blocks for m in b.modules()}
    if not any(id(layer_module(m)) in inside for m in targets.values()):
        return False
    try:
        return blocks_chain(model, blocks, calib.run, calib.samples[0])
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is a data error
        raise forward_error(exc) from exc


def _on_every_rank(step, *args):
    """``step(*args)``; under torchrun a ``SparsityError`` on any rank (an invalid calibration shard) is raised
    on every rank, which would otherwise wait forever for it in the next collective."""
    try:
        result, error = step(*args), None
    except SparsityError as exc:
        result, error = None, exc
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise SparsityError("another rank rejected its calibration shard (see that rank's error); every rank must "
                            "pass valid, non-empty inputs (sparsetorch.oneshot.shard_calibration splits a list)")
    return result


def _check_same_model(targets: dict[str, nn.Module]) -> None:
    """Under torchrun every rank must prune the same model: statistics of different weights cannot be pooled."""
    modules = {id(layer_module(m)): (n, layer_module(m)) for n, m in targets.items()}
    tensors, names = [], []
    for name, module in modules.values():
        for p in module.parameters(recurse=False):
            if p.device.type != "meta":
                tensors.append(p.detach())
                names.append(name)
    differ = sorted({names[i] for i in disagreeing(tensors)})
    if differ:
        raise SparsityError(f"the ranks hold different weights (e.g. {differ[:3]}); load the same model on every rank "
                            "(the same checkpoint, or the same seed) before prune_oneshot", layers=differ[:10])


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
