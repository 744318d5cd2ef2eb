"""``prune_oneshot``: prune a trained model in one shot from a little calibration data.

Transformers are processed block by block (SparseGPT/Wanda's sequential recipe): the inputs of
the first decoder block are captured with a hook that stops the forward pass, then each block
collects its layers' input statistics, is pruned, and is run again to give the next block its
(now pruned) inputs. Peak memory is about the model plus one block's activations and Hessians.
Any other module made of Linear layers is processed in one pass with hooks on every layer.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import resource
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError, SparsityWarning, check_sparsity
from ..core.masks import set_mask
from ..core.patterns import Pattern, check_pattern_fits, parse_pattern
from ..core.post_training import resolve_density
from ..core.layer_selection import as_spec_list, final_classifier, matches_spec
from . import solvers
from .blocks import blocks_chain, capture_first_block, find_blocks, to_device
from .linear_layers import attach_stats, is_linear_like, to_param_layout, weight_2d

__all__ = ["prune_oneshot", "wanda", "sparsegpt", "OneshotStats", "LayerResult", "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")
SparsitySpec = float | Mapping[str, float] | None


@dataclass
class LayerResult:
    name: str
    sparsity: float
    seconds: float
    damp: float | None = None  # SparseGPT: the damping that made H invertible
    rel_error: float | None = None  # SparseGPT: ||(W - W')X||^2 / ||WX||^2 on the calibration inputs
    numel: int = 0


@dataclass
class OneshotStats:
    """What a one-shot run did: per-layer results, time, where it ran and its peak memory."""

    method: str
    pattern: str
    mode: str  # "sequential" (block by block), "one-pass" (hooks on every layer) or "weights-only"
    device: str
    blocks: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""  # "cuda max allocated" or "process peak RSS"
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of weights removed over all pruned layers."""
        total = sum(r.numel for r in self.layers)
        return sum(r.sparsity * r.numel for r in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def prune_oneshot(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    method: str = "sparsegpt",
    sparsity: SparsitySpec = 0.5,
    pattern: str | Pattern = "unstructured",
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
            dicts of them (``{"input_ids": ..., "attention_mask": ...}``), or for a plain module any
            tensor/tuple it takes. Not needed for ``method="magnitude"``.
        method: "sparsegpt" (OBS weight updates), "wanda" (|W| * ||X||) or "magnitude" (|W|).
        sparsity: fraction removed per layer, or a dict of name globs to sparsities, e.g.
            ``{"attn": 0.4, "mlp": 0.6}`` (a key without ``*?[`` matches as a substring; the first
            matching key wins; every pruned layer must match one). N:M patterns fix it at 1 - N/M.
        pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8"); N:M groups run along the inputs.
        include, exclude: which Linear layers to prune, with the same rule as ``sparsetorch.prune``:
            module types or full-name globs (``"*attn*"``, ``"blocks.*.fc1"``). By default every
            Linear layer except the final classifier/lm_head; naming the head in ``include``
            prunes it. Embeddings are not Linear and are never pruned.
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

    Results are installed as sparsetorch masks, so the model stays sparse when fine-tuned.
    Nothing is changed if an argument or the calibration data is invalid.
    """
    started = time.perf_counter()
    cfg = _check_args(model, method, pattern, scope, block_size, damp)
    method, pat, scope = cfg
    compute = _resolve_device(device)
    include, exclude = _legacy_selection(include, exclude, skip, keep_head)
    targets = _select(model, include, exclude)
    densities = _densities(targets, sparsity, pat)
    for name, module in targets.items():
        check_pattern_fits(weight_2d(module).shape, pat, name)
        if not torch.isfinite(module.weight.detach()).all():
            raise SparsityError(f"{name} contains NaN or inf; fix the weights before pruning", layer=name)
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    solver = _Solver(method, pat, scope, block_size, damp, compute, densities)
    was_training = model.training
    model.eval()
    try:
        if method == "magnitude":
            stats = OneshotStats(method, str(pat), "weights-only", str(compute))
            for name, module in targets.items():
                stats.layers.append(solver.prune(name, module, None))
        else:
            samples, run_model = _prepare_calibration(model, calibration)
            found = find_blocks(model)
            if found is not None and _sequential_ok(model, found[1], run_model, samples, targets):
                stats = _run_sequential(model, found[1], targets, samples, run_model, solver, progress)
            else:
                stats = _run_one_pass(model, targets, samples, run_model, solver)
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - started
    stats.peak_memory_mb, stats.memory_kind = _peak_memory(compute)
    model.sparsetorch_stats = stats
    if return_stats is not None:
        warnings.warn("prune_oneshot(return_stats=...) is deprecated; it always returns the model, read "
                      "model.sparsetorch_stats for the stats", DeprecationWarning, stacklevel=2)
    return (model, stats) if return_stats else model


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

def _check_args(model, method, pattern, scope, block_size, damp) -> tuple[str, Pattern, str | None]:
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
    return method, pat, scope


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
    """Linear-like layers to prune, in module order, chosen as ``sparsetorch.prune`` does."""
    linears = [(name, m) for name, m in model.named_modules() if is_linear_like(m)]
    if not linears:
        raise SparsityError(f"{type(model).__name__} has no Linear layer to prune; one-shot pruning works on "
                            "nn.Linear (and transformers Conv1D) layers")
    includes, excludes = as_spec_list(include), as_spec_list(exclude)
    for spec in includes:
        if not any(matches_spec(n, m, [spec]) for n, m in linears):
            raise SparsityError(f"include pattern {spec!r} matches no Linear layer; layers are named like "
                                f"{[n for n, _ in linears[:5]]}", include=spec)
    if includes:
        chosen = [(n, m) for n, m in linears if matches_spec(n, m, includes)]
    else:
        head = final_classifier(model, linears)
        chosen = [(n, m) for n, m in linears if n != head]
    chosen = {n: m for n, m in chosen if not matches_spec(n, m, excludes)}
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


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return emb if isinstance(emb, nn.Embedding) else None


def _check_ids(ids: Any, vocab: int, i: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise SparsityError(f"calibration item {i}: expected a tensor of token ids, got {type(ids).__name__}",
                            item=i)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SparsityError(f"calibration item {i}: token ids must be an integer tensor, got {ids.dtype}; "
                            "tokenize the text (or use .long())", item=i, dtype=str(ids.dtype))
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise SparsityError(f"calibration item {i}: token ids must have shape [seq] or [batch, seq] with at least "
                            f"one token, got {tuple(ids.shape)}", item=i, shape=tuple(ids.shape))
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SparsityError(f"calibration item {i}: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                            f"got [{int(ids.min())}, {int(ids.max())}]", item=i)
    return ids.long() if ids.dim() == 2 else ids.long()[None, :]


def _prepare_calibration(model: nn.Module, calibration) -> tuple[list, Any]:
    """The calibration items as a list and a function running one through the model."""
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise SparsityError("calibration must be an iterable of model inputs (token-id tensors or dicts of them)")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() <= 1 else list(calibration)
    try:
        samples = list(calibration)
    except TypeError:
        raise SparsityError(f"calibration must be an iterable of model inputs, got "
                            f"{type(calibration).__name__}") from None
    if not samples:
        raise SparsityError("calibration is empty; pass at least one input (e.g. 128 sequences of 512 tokens)")
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    emb = _input_embedding(model)
    if emb is not None:  # a language model: token ids, validated up front
        params = inspect.signature(model.forward).parameters
        hf_style = "input_ids" in params  # transformers: keyword inputs, no KV cache while calibrating
        extra = {"use_cache": False} if "use_cache" in params or hf_style and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
        prepared = []
        for i, s in enumerate(samples):
            if isinstance(s, Mapping):
                if "input_ids" not in s:
                    raise SparsityError(f"calibration item {i}: a dict needs 'input_ids', got keys {sorted(s)}",
                                        item=i)
                prepared.append({**s, "input_ids": _check_ids(s["input_ids"], emb.num_embeddings, i)})
            else:
                ids = _check_ids(s, emb.num_embeddings, i)
                prepared.append({"input_ids": ids} if hf_style else ids)

        def run_lm(sample):
            sample = to_device(sample, home)
            return model(**sample, **extra) if isinstance(sample, Mapping) else model(sample)

        return prepared, run_lm
    for i, s in enumerate(samples):
        if not isinstance(s, (torch.Tensor, tuple, list, Mapping)):
            raise SparsityError(f"calibration item {i}: expected a tensor, tuple or dict of model inputs, got "
                                f"{type(s).__name__}", item=i)

    def run_plain(sample):
        sample = to_device(sample, home)
        if isinstance(sample, Mapping):
            return model(**sample)
        return model(*sample) if isinstance(sample, (tuple, list)) else model(sample)

    return samples, run_plain


def _forward_error(exc: Exception) -> SparsityError:
    return SparsityError(f"the calibration data could not be run through the model ({type(exc).__name__}: {exc}); "
                         "check the inputs' shape and dtype against what the model's forward takes")


def _sequential_ok(model, blocks, run_model, samples, targets) -> bool:
    """Block-by-block processing applies if the blocks hold the targets and chain exactly."""
    inside = {id(m) for b in blocks for m in b.modules()}
    if not any(id(m) in inside for m in targets.values()):
        return False
    try:
        return blocks_chain(model, blocks, run_model, samples[0])
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is a data error
        raise _forward_error(exc) from exc


# --- the two drivers ----------------------------------------------------------------------------

class _Solver:
    """Turns one layer plus its input statistics into new weights and a mask, and installs them."""

    def __init__(self, method, pat, scope, block_size, damp, device, densities):
        self.method, self.pat, self.scope = method, pat, scope
        self.block_size, self.damp, self.device, self.densities = block_size, damp, device, densities

    @torch.no_grad()
    def prune(self, name: str, module: nn.Module, stats) -> LayerResult:
        t0 = time.perf_counter()
        density = self.densities[name]
        W = weight_2d(module).detach().to(self.device, torch.float32)  # [out, in]
        result = LayerResult(name, 0.0, 0.0, numel=W.numel())
        if self.method == "magnitude":
            keep, new_w = solvers.magnitude_mask(W, density, self.pat, self.scope or "layer"), None
        elif self.method == "wanda":
            keep, new_w = solvers.wanda_mask(W, stats.sq_norm, density, self.pat, self.scope or "row"), None
        else:
            H = stats.hessian()
            new_w, keep, result.damp = solvers.sparsegpt_solve(W, H, density, self.pat, self.block_size, self.damp)
            diff = W - new_w
            base = float(((W @ H) * W).sum())
            result.rel_error = float(((diff @ H) * diff).sum()) / base if base > 0 else 0.0
        if new_w is not None:
            module.weight.copy_(to_param_layout(module, new_w).to(module.weight.device, module.weight.dtype))
        set_mask(module, to_param_layout(module, keep).to(module.weight.device))
        result.sparsity = 1.0 - float(keep.float().mean())
        result.seconds = time.perf_counter() - t0
        return result


def _skip_unused(name: str, stats) -> bool:
    if stats.count:
        return False
    warnings.warn(f"{name} received no input from the calibration data; it is left dense", SparsityWarning,
                  stacklevel=3)
    return True


def _run_one_pass(model, targets, samples, run_model, solver) -> OneshotStats:
    stats, handles = attach_stats(targets, solver.device, hessian=solver.method == "sparsegpt")
    try:
        with torch.no_grad():
            for sample in samples:
                run_model(sample)
    except Exception as exc:  # noqa: BLE001 - the model is untouched so far
        raise _forward_error(exc) from exc
    finally:
        for h in handles:
            h.remove()
    out = OneshotStats(solver.method, str(solver.pat), "one-pass", str(solver.device))
    for name, module in targets.items():
        if not _skip_unused(name, stats[name]):
            out.layers.append(solver.prune(name, module, stats[name]))
    return out


@torch.no_grad()
def _run_sequential(model, blocks, targets, samples, run_model, solver, progress) -> OneshotStats:
    from tqdm.auto import tqdm

    try:
        calls = capture_first_block(model, blocks[0], run_model, samples)
    except Exception as exc:  # noqa: BLE001 - the model is untouched so far
        raise _forward_error(exc) from exc
    device = solver.device
    hidden = [c.hidden.to(device) for c in calls]  # inputs of the current block, one per sample
    out = OneshotStats(solver.method, str(solver.pat), "sequential", str(device), blocks=len(blocks))
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = [n for n, m in targets.items() if id(m) not in inside]
    if outside:
        warnings.warn(f"{outside} lie outside the repeated blocks and are left dense; prune them with "
                      "sparsetorch.prune if needed", SparsityWarning, stacklevel=3)
    for block in tqdm(blocks, desc=f"{solver.method} blocks", disable=None if progress is None else not progress):
        home = next(block.parameters()).device
        block.to(device)
        layers = {names[id(m)]: m for m in block.modules() if names.get(id(m)) in targets}
        stats, handles = attach_stats(layers, device, hessian=solver.method == "sparsegpt")
        try:
            for call, h in zip(calls, hidden):
                call.run(block, h, device)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in layers.items():
            if not _skip_unused(name, stats[name]):
                out.layers.append(solver.prune(name, module, stats[name]))
        del stats
        # the next block sees this block's pruned outputs, as it will at inference
        hidden = [call.run(block, h, device) for call, h in zip(calls, hidden)]
        block.to(home)
    return out


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
