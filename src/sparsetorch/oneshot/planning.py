"""Everything ``prune_oneshot`` checks and decides before a weight is touched: the recipe, the layers to
prune, their densities and where the math runs. Shared by the in-memory run (``api``) and the out-of-core
run over a checkpoint folder (``out_of_core``), so both refuse the same bad input with the same message."""
from __future__ import annotations

import fnmatch
import math
import resource
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
from .experts import (ExpertSlice, check_experts_understood, layer_matches, layer_module, prunable_layers,
                      router_names)
from .calibration import prepare_calibration
from .drivers import Job
from .layer_pruner import METHOD_NEEDS, LayerPruner, Recipe
from .linear_layers import weight_2d
from .owl import OWL
from .quantize import QuantGrid

METHODS = tuple(METHOD_NEEDS)
DISTRIBUTIONS = ("uniform", "owl")
REFINEMENTS = (None, "dsnot")
SparsitySpec = float | Mapping[str, float] | None


def plan_job(model: nn.Module, calibration: Iterable[Any] | None, *, method: str = "sparsegpt",
             sparsity: SparsitySpec = 0.5, pattern: str | Pattern = "unstructured", distribution: str | OWL = "uniform",
             permute: bool = False, refine: str | None = None, bits: int | None = None, group_size: int | None = None,
             include=None, exclude=None, skip=None, scope: str | None = None, block_size: int = 128,
             damp: float = 0.01, keep_head: bool | None = None, device=None, progress: bool | None = None,
             check_values: bool = True, calibration_device: torch.device | None = None) -> Job:
    """Every argument of ``prune_oneshot`` checked and turned into a ``Job`` (calibration prepared only when
    the recipe needs data). ``check_values=False`` skips the NaN/inf check of the weights, for a model whose
    blocks are still on the meta device (the out-of-core run checks each block when it reads it)."""
    recipe = check_args(model, method, pattern, scope, block_size, damp, permute, bits, group_size, refine)
    owl = check_distribution(distribution, recipe.pattern, sparsity)
    compute = resolve_device(device)
    include, exclude = legacy_selection(include, exclude, skip, keep_head)
    targets = select_targets(model, include, exclude)
    densities = densities_for(targets, sparsity, recipe.pattern)
    if recipe.grid is not None:  # only the pruned layers are quantized: embeddings and the head may be any dtype
        wrong = {str(weight_2d(m).dtype) for m in targets.values() if weight_2d(m).dtype != torch.float32}
        if wrong:
            raise SparsityError(f"bits={bits} puts the kept weights exactly on an int{bits} grid, which needs float32 "
                                f"weights; the layers to prune have {sorted(wrong)} (load the model with "
                                "torch_dtype=torch.float32)", bits=bits)
    for name, module in targets.items():
        check_pattern_fits(weight_2d(module).shape, recipe.pattern, name)
        if check_values and not torch.isfinite(module.weight.detach()).all():
            raise SparsityError(f"{name} contains NaN or inf; fix the weights before pruning", layer=name)
    needs_data = recipe.needs_data or owl is not None
    if needs_data and is_distributed():
        check_same_model(targets)
    calib = on_every_rank(prepare_calibration, model, calibration, device=calibration_device) if needs_data else None
    return Job(model, targets, calib, LayerPruner(recipe, compute), densities, owl, progress)

def on_every_rank(step, *args, **kwargs):
    """``step(*args, **kwargs)``; under torchrun a ``SparsityError`` on any rank (an invalid calibration shard) is
    raised on every rank, which would otherwise wait forever for it in the next collective."""
    try:
        result, error = step(*args, **kwargs), None
    except SparsityError as exc:
        result, error = None, exc
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise SparsityError("another rank rejected its calibration shard (see that rank's error); every rank must "
                            "pass valid, non-empty inputs (sparsetorch.oneshot.shard_calibration splits a list)")
    return result


def check_same_model(targets: dict[str, nn.Module]) -> None:
    """Under torchrun every rank must prune the same model: statistics of different weights cannot be pooled.
    Weights still on the meta device (out of core) are checked block by block as they are read."""
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


def check_args(model, method, pattern, scope, block_size, damp, permute, bits, group_size, refine) -> Recipe:
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
    elif group_size is not None:
        raise SparsityError("group_size applies to quantization; pass bits=8 or bits=4 with it", group_size=group_size)
    if refine not in REFINEMENTS:
        raise SparsityError(f"unknown refine {refine!r}; choose one of {list(REFINEMENTS)}", refine=refine)
    return Recipe(method, pat, scope, block_size, float(damp), bool(permute), grid, refine)


def check_distribution(distribution, pat: Pattern, sparsity) -> OWL | None:
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


def resolve_device(device) -> torch.device:
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


def legacy_selection(include, exclude, skip, keep_head):
    """Map the deprecated ``skip=``/``keep_head=`` onto ``include=``/``exclude=``, with a warning."""
    if skip is not None:
        new = skip_to_exclude(skip)
        warnings.warn(f"prune_oneshot(skip=...) is deprecated; use exclude={new}", DeprecationWarning, stacklevel=5)
        exclude = as_spec_list(exclude) + new
    if keep_head is not None:
        warnings.warn("prune_oneshot(keep_head=...) is deprecated; the head is kept dense by default, "
                      "include it explicitly with include=['*'] or its name", DeprecationWarning, stacklevel=5)
        if keep_head is False and include is None:
            include = ["*"]
    return include, exclude


def select_targets(model: nn.Module, include, exclude) -> dict[str, nn.Module]:
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


def densities_for(targets: dict[str, nn.Module], sparsity: SparsitySpec, pat: Pattern) -> dict[str, float]:
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


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
