"""Deciding where fusion pays: every candidate module is rewritten with FusedChains, checked to reproduce its
outputs on the example, timed against its layers as they are, and kept only where it measured faster."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparsityWarning
from ..kernels import inference_ops
from ..tracing import hooked
from .chain_rewrite import fused_graph, fused_sequential, get_path, has_path, set_path
from .kernel_choice import KERNEL_CACHE, outputs_close, time_candidates
from .packed_modules import PackedLinear

__all__ = ["fuse_chains", "linear_predicate"]


def linear_predicate(min_sparsity: float) -> Callable[[nn.Module], bool]:
    def is_linear(mod) -> bool:
        if isinstance(mod, PackedLinear):
            if mod.packed is not None and mod.kernel == "bitmask":  # exact only with float32 values (no rounding to undo)
                return mod.packed.values.dtype == torch.float32 and not mod.packed.dense_values
            return mod.packed is not None and mod.kernel in ("csr", "nm", "bsr", "torch-csr", "torch-bsr")
        if type(mod) is not nn.Linear or mod.weight.dtype != torch.float32 or mod.weight.device.type != "cpu":
            return False
        # a large dense layer runs faster on torch's dense matmul than as a full CSR matrix inside a chain
        w = mod.weight
        return w.numel() <= 65536 or float((w == 0).float().mean()) >= min_sparsity
    return is_linear


def fuse_chains(model: nn.Module, args: tuple, plan: list[dict], budget_s: float, min_sparsity: float,
                verbose: bool = False, always: bool = False) -> nn.Module:
    """Replace runs of Linear (+ activation) in ``model`` by FusedChain modules where that measured faster
    than the layers as they are (per-layer kernels); returns the model (a new object if the root changed).
    Each fused candidate must reproduce the module's output on the example; rows are added to ``plan``.
    ``always``: keep every chain that reproduces the outputs, without timing."""
    if not inference_ops.available():
        return model
    is_linear = linear_predicate(min_sparsity)
    rows = {r["layer"]: r for r in plan}
    candidates = chain_candidates(model, is_linear)
    seen = capture_inputs(model, args, candidates)
    for name, mod in sorted(candidates, key=lambda nm: -nm[0].count(".") if nm[0] else 1):  # innermost first
        if name not in seen or (name and (not has_path(model, name) or get_path(model, name) is not mod)):
            continue  # never called by the example, or inside a module already replaced
        mine = [r["batch"] for r in plan if r.get("batch") and (not name or r["layer"].startswith(name + "."))]
        batch = min(mine or [1])  # rows of the example per layer call
        found = build_fused(mod, name, rows, is_linear, batch)
        if found is None:
            continue
        after, fused = found
        decided = decide(mod, after, fused, seen[name], batch, budget_s, always)
        if decided is None:
            continue  # the fused copy does not reproduce the module
        best, times = decided
        record(plan, rows, name, fused, best, times)
        if verbose:
            print(f"{name or '(model)'} chains: {best}  " + "  ".join(f"{k}={v * 1e3:.3f}ms" for k, v in times.items()))
        if best != "per-layer":
            if name:
                set_path(model, name, after)
            else:
                after.sparsetorch_plan = plan
                model = after
    return model


def chain_candidates(model: nn.Module, is_linear) -> list[tuple[str, nn.Module]]:
    """Modules with a fusable Linear among their children (or inside a ModuleList/ModuleDict child)."""
    def has_linear_child(m) -> bool:
        kids = list(m.children())
        kids += [g for k in kids if isinstance(k, (nn.ModuleList, nn.ModuleDict)) for g in k.children()]
        return any(is_linear(k) for k in kids)

    return [(n, m) for n, m in model.named_modules()
            if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and not is_linear(m) and has_linear_child(m)]


def capture_inputs(model: nn.Module, args: tuple, candidates) -> dict[str, tuple]:
    """name -> (args, kwargs) of each candidate's first call while the model runs on the example."""
    seen: dict[str, tuple] = {}

    def keep_first(name: str):
        def hook(m, a, kw) -> None:  # a pre-hook that returned a value would replace the input
            seen.setdefault(name, (a, kw))
        return hook

    with hooked(mod.register_forward_pre_hook(keep_first(name), with_kwargs=True) for name, mod in candidates), \
            torch.no_grad():
        model(*args)
    return seen


def build_fused(mod: nn.Module, name: str, rows: dict, is_linear, batch: int):
    """``(fused copy, [(name, FusedChain)])`` of mod, or None (no chain, or it could not be rewritten)."""
    build = fused_sequential if isinstance(mod, nn.Sequential) else fused_graph
    try:
        return build(mod, name, rows, is_linear, batch)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        warnings.warn(f"{name or type(mod).__name__}: chains not fused ({exc})", SparsityWarning, stacklevel=4)
        return None


@torch.no_grad()
def decide(mod: nn.Module, after: nn.Module, fused: list, call: tuple, batch: int, budget_s: float,
           always: bool) -> tuple[str, dict] | None:
    """``(winner, seconds per candidate)`` of the module as is vs fused (None if the fused copy is wrong)."""
    a, kw = call
    try:
        ok = outputs_close(after(*a, **kw), mod(*a, **kw))
    except Exception:  # noqa: BLE001 - a forward that used the replaced children by name
        ok = False
    if not ok:
        return None
    if always:
        return "fused", {}
    key = ("chain", tuple((w.format, w.out_features, w.in_features, w.nnz, act) for _, f in fused
                          for w, act in zip(f.weights, f.acts)), batch, torch.get_num_threads(),
           inference_ops.best_isa())
    if key in KERNEL_CACHE:
        return KERNEL_CACHE[key], {}
    times = time_candidates(candidate_calls(mod, after, fused, a, kw), budget_s, cuda=False)
    KERNEL_CACHE[key] = min(times, key=times.get)
    return KERNEL_CACHE[key], times


def candidate_calls(mod, after, fused, a, kw) -> dict:
    """The ways to run the module: as is, fused, and fused on one thread (tiny chains on a shared CPU)."""
    fns = {"per-layer": lambda: mod(*a, **kw), "fused": lambda: after(*a, **kw)}
    if torch.get_num_threads() > 1:
        def one_thread():
            for _, f in fused:
                f.threads = 1
            try:
                return after(*a, **kw)
            finally:
                for _, f in fused:
                    f.threads = None
        fns["fused/1t"] = one_thread
    return fns


def record(plan: list[dict], rows: dict, name: str, fused: list, best: str, times: dict) -> None:
    """Add each chain's verdict to the plan and mark its layers as fused (when fusion won)."""
    prefix = f"{name}." if name else ""
    for child, f in fused:
        plan.append({"layer": prefix + child, "type": "FusedChain", "layers": list(f.names),
                     "formats": [w.format for w in f.weights], "activations": list(f.acts),
                     "batch": rows.get(f.names[0], {}).get("batch"),
                     "kernel": best, "ms": {k: v * 1e3 for k, v in times.items()}})
        if best != "per-layer":
            f.threads = 1 if best == "fused/1t" else None
            for layer in f.names:
                if layer in rows:
                    rows[layer]["fused_into"] = prefix + child
