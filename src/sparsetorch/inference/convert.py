"""``to_inference``: turn a pruned model into one whose sparse layers run on the fastest kernel here.

For every Linear (and groups=1 Conv2d, through unfold) whose weight has zeros, the candidates are

* ``dense``: the masked dense layer (torch / MKL),
* ``csr`` / ``nm`` / ``bsr``: sparsetorch's compiled kernels (when built), N:M and block only if the
  weight's zeros actually form that pattern,
* ``torch-csr`` / ``torch-bsr``: torch's sparse kernels with int32 indices,

and the winner is chosen by *timing them on this machine* with the layer's real input (batch size
included), interleaved, median of several rounds. Choices are cached in memory by
(shape, sparsity, pattern, batch, threads), so converting a second model of the same shapes is quick.
Each candidate's output is checked against the dense layer; one that disagrees is never chosen.
On CUDA the candidates are dense, 2:4 semi-structured (``torch.sparse.to_sparse_semi_structured``)
and BSR.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.masks import remove_masks
from ..errors import SparsityError, SparsityWarning
from ..kernels import extension_isa, has_extension
from ..kernels.bitmask_weight import BitmaskWeight, has_int8_activations
from ..kernels.column_bitmask import ColumnBitmaskWeight, sparsify_input
from ..kernels.dense_columns import DenseColumnWeight
from ..kernels.packed import BSRWeight, CSRWeight, NMWeight, PackedWeight
from ..tracing import hooked
from .activation_sparsity import ActivationSparsity
from .arena import use_huge_pages
from .chain_decision import fuse_chains
from .compiled_decode import compile_decode
from .gqa_attention import use_packed_decode_attention
from .kernel_choice import EVICT_BYTES, KERNEL_CACHE, max_error, rtol, time_candidates
from .packed_modules import PackedConv2d, PackedLinear, SparsifiedInputLinear
from .sibling_choice import Sibling, shared_layout
from .siblings import combinable, fuse_siblings, recording_hook, sibling_groups

__all__ = ["to_inference", "detect_structure"]

# candidate block shapes (rows x cols of W) and N:M group sizes worth trying
BLOCKS = ((16, 16), (8, 8), (4, 4), (1, 16), (1, 8))
NM_GROUPS = (4, 8, 16, 32)
# ---------------------------------------------------------------------------------------------- structure


def detect_structure(w: torch.Tensor) -> dict:
    """The patterns w's zeros follow: best N:M (n, m) and the block shapes, each only if it stores at most
    25% more entries than the nonzeros themselves (so a kernel on it could pay)."""
    out, inp = w.shape
    nnz = max(int((w != 0).sum()), 1)
    found: dict = {"nm": None, "blocks": []}
    for m in NM_GROUPS:
        if inp % m == 0:
            n = max(NMWeight.group_count(w, m), 1)
            if n < m and out * inp // m * n <= 1.25 * nnz and (found["nm"] is None or n / m < found["nm"][0] / found["nm"][1]):
                found["nm"] = (n, m)
    for r, c in BLOCKS:
        if out % r == 0 and inp % c == 0 and (r, c) != (1, 1):
            stored = int((BSRWeight.blocks(w, r, c) != 0).any(-1).any(-1).sum()) * r * c
            if stored <= 1.25 * nnz:
                found["blocks"].append((r, c))
    found["blocks"] = found["blocks"][:2]  # the two largest fitting blocks
    return found


def _signature(structure: dict) -> str:
    parts = [f"{structure['nm'][0]}:{structure['nm'][1]}"] if structure["nm"] else []
    parts += [f"{r}x{c}" for r, c in structure["blocks"]]
    return ",".join(parts) or "unstructured"


# ---------------------------------------------------------------------------------------------- candidates


def _cpu_candidates(w: torch.Tensor, bias: torch.Tensor | None, structure: dict,
                    values: str = "fp32") -> dict[str, Callable[[], PackedLinear | None]]:
    """name -> builder of the PackedLinear (None = keep the dense layer). With lossy ``values`` only the
    bitmask kernels with those values are candidates (the user asked for that storage)."""
    out, inp = w.shape
    if values != "fp32":
        return _lossy_candidates(w, bias, values)
    cands: dict[str, Callable] = {"dense": lambda: None}
    csr = CSRWeight.from_dense(w)
    if has_extension():
        packed = {"csr": csr, "bitmask": BitmaskWeight.from_dense(w)}
        if structure["nm"]:
            n, m = structure["nm"]
            packed[f"nm:{n}:{m}"] = NMWeight.from_dense(w, n, m)
        for r, c in structure["blocks"]:
            packed[f"bsr:{r}x{c}"] = BSRWeight.from_dense(w, r, c)
        # with several threads also try one: on a shared CPU short calls often lose waiting for the second
        for threads in (None, 1) if torch.get_num_threads() > 1 else (None,):
            for name, p in packed.items():
                cands[name + ("" if threads is None else "/1t")] = (
                    lambda p=p, t=threads: PackedLinear(inp, out, bias, p.format, p, threads=t))
    cands["torch-csr"] = lambda: PackedLinear(inp, out, bias, "torch-csr", csr)
    for r, c in structure["blocks"][:1]:
        bsr_t = BSRWeight.from_dense(w, r, c)
        cands[f"torch-bsr:{r}x{c}"] = lambda: PackedLinear(inp, out, bias, "torch-bsr", bsr_t)
    return cands


VALUES = ("fp32", "bf16", "fp16", "int8")


def _lossy_candidates(w: torch.Tensor, bias: torch.Tensor | None, values: str,
                      dense: bool = False) -> dict[str, Callable]:
    """bitmask kernels over bf16 / fp16 / int8 values (int8 also with int8 activations, AVX2 or VNNI)."""
    if not has_extension():
        raise SparsityError(f"values={values!r} needs sparsetorch's compiled kernels, which are not built here",
                            fix="reinstall with a C++17 compiler, or use values='fp32'")
    out, inp = w.shape
    options = [False, True] if values == "int8" and has_int8_activations() else [False]
    cands: dict[str, Callable] = {}
    for qx in options:
        p = BitmaskWeight.from_dense(w, values, quantize_input=qx, dense=dense)
        cands[("dense-" if dense else "bitmask-") + values + ("-q8" if qx else "")] = (
            lambda p=p: PackedLinear(inp, out, bias, p.format, p))
    if not dense:  # the same values without a mask, zeros stored: where expanding the mask costs more than the
        # bytes it saves (on AVX2, without an expand instruction, 70% int8 ran 1.8 ms against 0.6 ms dense)
        p = BitmaskWeight.from_dense(w, values, dense=True)
        cands["dense-" + values] = lambda p=p: PackedLinear(inp, out, bias, p.format, p)
    return cands


def _dense_candidates(w: torch.Tensor, bias: torch.Tensor | None, values: str) -> dict[str, Callable]:
    """A dense layer on the bitmask kernels without a mask: in ``values``; fp32 also keeps torch's layer."""
    if values != "fp32":
        return _lossy_candidates(w, bias, values, dense=True)
    out, inp = w.shape
    packed = BitmaskWeight.from_dense(w, dense=True)
    return {"dense": lambda: None, "dense-fp32": lambda: PackedLinear(inp, out, bias, packed.format, packed)}


def _cuda_candidates(w: torch.Tensor, bias: torch.Tensor | None, structure: dict) -> dict[str, Callable]:
    out, inp = w.shape
    cands: dict[str, Callable] = {"dense": lambda: None}
    two_four = w.shape[1] % 4 == 0 and NMWeight.group_count(w, 4) <= 2
    if two_four and w.dtype in (torch.float16, torch.bfloat16):
        def semi():
            from torch.sparse import to_sparse_semi_structured

            return PackedLinear(inp, out, bias, "semi-structured", weight=to_sparse_semi_structured(w))
        cands["semi-structured"] = semi
    for r, c in structure["blocks"][:1]:
        cands[f"cuda-bsr:{r}x{c}"] = lambda: PackedLinear(inp, out, bias, "cuda-bsr",
                                                           weight=w.to_sparse_bsr((r, c)))
    return cands


def _choose(key: tuple, dense: nn.Module, x: torch.Tensor, cands: dict[str, Callable], budget_s: float,
            cuda: bool, cold: bool = False) -> tuple[str, nn.Module | None, dict[str, float], dict[str, str]]:
    """Build the candidates, drop any that fail or disagree with dense (-> skipped: name -> why), time the
    rest (unless cached; ``cold``: each call with its weight out of cache, as at decode)."""
    skipped: dict[str, str] = {}
    with torch.no_grad():
        ref = dense(x)
        scale = float(ref.abs().max()) + 1e-6
        built: dict[str, nn.Module | None] = {}
        for name, build in cands.items():
            try:
                mod = build()
                if mod is not None:
                    lossy = isinstance(mod.packed, BitmaskWeight) and mod.packed.values.dtype != torch.float32
                    own = F.linear(x.float(), mod.packed.to_dense(), mod.bias) if lossy else ref
                    err = float((mod(x).float() - own.float()).abs().max())
                    tol = 3e-2 if lossy and mod.packed.quantize_input else rtol(x.dtype)
                    if not err <= tol * scale + 1e-5 * x.shape[-1] ** 0.5:
                        skipped[name] = f"disagrees with dense (max error {err:.3g})"
                        warnings.warn(f"kernel {name} {skipped[name]}; not used", SparsityWarning, stacklevel=3)
                        continue
                built[name] = mod
            except (RuntimeError, ValueError, TypeError) as exc:  # kernel not supported for this shape/device
                skipped[name] = f"unavailable here ({exc})"
                warnings.warn(f"kernel {name} {skipped[name]}; not used", SparsityWarning, stacklevel=3)
        if key in KERNEL_CACHE and KERNEL_CACHE[key] in built:
            return KERNEL_CACHE[key], built[KERNEL_CACHE[key]], {}, skipped
        fns = {name: (lambda m=(mod or dense): m(x)) for name, mod in built.items()}
        times = time_candidates(fns, budget_s, cuda, cold) if len(fns) > 1 else {name: float("nan") for name in fns}
    best = min(times, key=lambda k: times[k]) if len(times) > 1 else next(iter(times), "dense")
    KERNEL_CACHE[key] = best
    return best, built.get(best), times, skipped


# ---------------------------------------------------------------------------------------------- conversion


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise SparsityError("example_inputs must be a tensor or a tuple of tensors (the model's forward arguments)",
                        got=type(example_inputs).__name__)


def _capture_inputs(model: nn.Module, args: tuple) -> tuple[dict[str, torch.Tensor], list[list[str]], torch.Tensor]:
    """First input of every Linear / Conv2d for the example, the groups of Linears called on the same input
    (``sibling_groups``), and the model's output."""
    seen: dict[str, torch.Tensor] = {}
    calls: list[tuple] = []

    def keep_first(name: str):
        def hook(m, inp) -> None:  # a pre-hook that returned a value would replace the input
            seen.setdefault(name, inp[0].detach())
        return hook

    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    # the calls recorded before any thresholding hook replaces the input: siblings share the tensor they are given
    hooks = [*(mod.register_forward_pre_hook(recording_hook(calls, name), prepend=True) for name, mod in layers
               if isinstance(mod, nn.Linear)),
             *(mod.register_forward_pre_hook(keep_first(name)) for name, mod in layers)]
    with hooked(hooks), torch.no_grad():
        out = model(*args)
    return seen, sibling_groups(calls), out


def _sparse_params(mod: nn.Module) -> bool:
    return any(p.numel() > 1 and bool((p == 0).any()) for n, p in mod.named_parameters(recurse=False) if n == "weight")


def to_inference(model: nn.Module, example_inputs, *, budget_s: float = 0.3, min_sparsity: float = 0.3,
                 fuse: bool | str = True, values: str = "fp32", decode: bool | None = None,
                 activation_sparsity: ActivationSparsity | None = None, compile: bool = False,
                 verbose: bool = False) -> nn.Module:
    """A copy of ``model`` for inference (eval mode, no grad) in which each sparse Linear / Conv2d runs on
    the kernel measured fastest for its shape, sparsity, pattern and the batch of ``example_inputs``.

    ``model`` is left untouched. Pruned weights are the zeros of the weights (masks are applied first).
    Layers sparser than ``min_sparsity`` are timed; others stay dense. Layer types without a sparse
    kernel stay dense (exact) with a SparsityWarning. ``budget_s`` bounds the timing per layer.

    With ``fuse`` (and the compiled kernels), runs of Linear layers joined by ReLU / GELU / tanh / sigmoid
    (in ``nn.Sequential`` children, or in a forward that torch.fx can trace) are then timed as one
    :class:`~sparsetorch.inference.fused_chain.FusedChain` against the layers as converted, and the faster is kept: for
    small layers the per-call overhead, not the arithmetic, is what a chain saves. ``fuse="always"``
    keeps every chain that reproduces the outputs without timing it; ``fuse=False`` never fuses.
    The plan (per layer: kernel, ms per timed candidate, skipped candidates and why; per chain a
    ``FusedChain`` row, and ``fused_into`` on its layers when the fused version won) is in
    ``result.sparsetorch_plan``.

    ``values`` ("fp32" exact; "bf16", "fp16" or "int8", lossy) stores the kept weights of the sparse layers
    in that type on the bitmask kernels (csrc/decode_impl.inc): fewer bytes per decode step. int8 uses a
    scale per row and, where the CPU has AVX-512 VNNI, is also timed with int8 activations. Each such layer
    must agree with its own dequantized weight; the model as a whole then differs from the fp32 one by
    the rounding of its weights (not checked against it). With lossy values the dense Linear layers (an
    LLM's lm_head) are stored in that type too, on the same kernels without a mask. At decode in fp32 those
    dense layers are timed on the same kernel against torch's and keep the faster.

    ``decode`` times every layer on one row of its input (the matrix-vector work of generating one token
    at a time) instead of the whole example batch; the default is True for models with a ``generate``
    method (Hugging Face decoders), whose example prompt would otherwise pick the prefill kernel.

    ``activation_sparsity`` (from :func:`~sparsetorch.inference.activation_sparsity.calibrate_activation_sparsity`)
    zeroes each calibrated Linear's inputs of magnitude at most its threshold (TEAL) and runs that layer, pruned
    or dense, on a column kernel that skips the weights of zeroed inputs (values as ``values``): its kept values
    in tiles (``ColumnBitmaskWeight``; with fp32 values it streams them all, which measured faster:
    ``skip_columns``) or all its values in whole columns (``DenseColumnWeight``: on CPUs without AVX-512 a pruned
    layer's mask costs more to expand than its bytes save), or on the fastest row kernel behind the same threshold
    (``SparsifiedInputLinear``: int8 x int8 rows with VNNI), whichever is timed fastest on one row. Each column
    layer is checked against torch on its input with the thresholds applied (``activation_sparsity.attach``); the
    whole model is not, as a float-order difference upstream can move an input across its threshold.
    ``compile=True`` returns the model through :func:`~sparsetorch.inference.compiled_decode.compile_decode`:
    a decoder's ``generate()`` then compiles its decode step with ``torch.compile`` (static KV cache), any
    other model is returned ``torch.compile``'d. The sparse layers are ``torch.ops.sparsetorch`` operators in
    the graph (no graph break); the first call compiles (tens of seconds on CPU). At decode a transformers
    decoder with grouped-query ``sdpa`` attention is switched to :mod:`~sparsetorch.inference.gqa_attention`'s
    (the same math; one query token on the compiled kernel), compiled or not.
    """
    if values not in VALUES:
        raise SparsityError(f"unknown values {values!r}; use one of {list(VALUES)}")
    if not isinstance(model, nn.Module):
        raise SparsityError("to_inference takes an nn.Module", got=type(model).__name__)
    args = _as_args(example_inputs)
    if activation_sparsity is not None and not isinstance(activation_sparsity, ActivationSparsity):
        raise SparsityError("activation_sparsity takes the thresholds calibrate_activation_sparsity returns",
                            got=type(activation_sparsity).__name__,
                            fix="act = sparsetorch.inference.calibrate_activation_sparsity(model, ids, sparsity=0.4)")
    inf = copy.deepcopy(model)
    remove_masks(inf)  # zero pruned weights; drop masks and hooks (in the copy only)
    inf.eval().requires_grad_(False)
    thresholded = {} if activation_sparsity is None else activation_sparsity.check(inf)
    # the reference of thresholded layers: the same thresholds in torch
    with activation_sparsity.attach(inf) if thresholded else contextlib.nullcontext():
        seen, groups, ref_out = _capture_inputs(inf, args)
    threads = torch.get_num_threads()
    decode = hasattr(model, "generate") if decode is None else bool(decode)
    # a decode step finds each weight out of cache once the model's weights outgrow the cache: time them so
    cold = decode and sum(p.numel() * p.element_size() for p in inf.parameters()) > EVICT_BYTES
    plan = []
    modules = list(inf.named_modules())
    # the module position after which each sibling's group is complete (thresholded layers run apart)
    position = {name: i for i, (name, _) in enumerate(modules)}
    complete_at = {n: max(position[m] for m in g) for g in groups
                   if fuse and (set(g) <= set(thresholded) or not set(g) & set(thresholded)) for n in g}
    group_of = {n: g for g in groups for n in g if n in complete_at}
    waiting: dict[str, Sibling] = {}
    apart: dict[str, tuple[nn.Module, str]] = {}  # siblings moved to a shared layout: their own choice
    for i, (name, mod) in enumerate(modules):
        for n in [n for n in waiting if complete_at[n] < i]:  # a sibling stayed dense: its group is not converted
            del waiting[n]
        if name in thresholded:
            threshold = activation_sparsity.thresholds[name]
            new, kernel, times, options, key = _thresholded_layer(name, mod, threshold, values, seen.get(name),
                                                                  budget_s, cold, sibling=name in group_of)
            plan.append({"layer": name, "type": "Linear", "shape": [mod.out_features, mod.in_features],
                         "density": float((mod.weight != 0).float().mean()), "pattern": "activation-sparse",
                         "batch": 1, "kernel": kernel, "threshold": threshold,
                         "ms": {k: v * 1e3 for k, v in times.items()}, "skipped": {}})
            inf.set_submodule(name, new)
            if name in group_of and name in seen:
                x = seen[name].reshape(-1, mod.in_features)[:1].float()
                apart.update(_sibling_converted(inf, Sibling(name, new, options, key), group_of[name], waiting,
                                                plan, x, budget_s, cold, verbose))
            continue
        # dense Linears (an LLM's lm_head) are candidates too: in a lossy value type, and at decode, where our
        # dense matrix-vector kernel streams fp32 weights faster than torch's (benchmarks/bench_decode.py)
        dense_candidate = isinstance(mod, nn.Linear) and name in seen and (values != "fp32" or decode)
        if not _sparse_params(mod) and not dense_candidate:
            continue
        supported = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                                    and mod.padding_mode == "zeros" and not isinstance(mod.padding, str))
        dtype_ok = mod.weight.dtype == torch.float32 or mod.weight.is_cuda
        if not supported or not dtype_ok or name not in seen:
            why = ("no sparse kernel for this layer type" if not supported else
                   "only float32 runs on the sparse CPU kernels" if not dtype_ok else "not called by the example")
            warnings.warn(f"{name or type(mod).__name__} ({type(mod).__name__}) stays dense: {why}",
                          SparsityWarning, stacklevel=2)
            continue
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)  # [out, in(*kh*kw)]
        density = float((w != 0).float().mean())
        dense_kernel = (density > 1 - min_sparsity and dense_candidate and not mod.weight.is_cuda
                        and (values != "fp32" or has_extension()))
        if density > 1 - min_sparsity and not dense_kernel:
            continue
        x = seen[name]
        if isinstance(mod, nn.Conv2d):  # the matmul the unfold path runs: [N*L, C*kh*kw]
            x = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2).reshape(-1, w.shape[1])
            dense_fn = lambda t, m=mod, w=w: F.linear(t, w, m.bias)  # noqa: E731
        else:
            x = x.reshape(-1, w.shape[1])
            x = x[:1] if decode else x
            dense_fn = mod
        structure = detect_structure(w)
        cuda = w.is_cuda
        key = (type(mod).__name__, *w.shape, round(density, 3), _signature(structure), x.shape[0], threads,
               str(w.device), extension_isa(), values, cold)
        if dense_kernel:
            cands = _dense_candidates(w, mod.bias, values)
        else:
            cands = _cuda_candidates(w, mod.bias, structure) if cuda else _cpu_candidates(w, mod.bias, structure, values)
        kernel, new, times, skipped = _choose(key, dense_fn, x, cands, budget_s, cuda, cold=cold)
        plan.append({"layer": name, "type": type(mod).__name__, "shape": list(w.shape), "density": density,
                     "pattern": _signature(structure), "batch": int(x.shape[0]), "kernel": kernel,
                     "ms": {k: v * 1e3 for k, v in times.items()}, "skipped": skipped})
        if verbose:
            print(f"{name}: {kernel}  " + "  ".join(f"{k}={v * 1e3:.3f}ms" for k, v in times.items()))
        if new is not None:
            new = PackedConv2d(mod, new) if isinstance(mod, nn.Conv2d) else new
            if name:
                inf.set_submodule(name, new)
            else:  # the model is itself one layer
                inf = new
        if name in group_of and not cuda:  # the candidates that could share a call kept, built (packs shared)
            options = {n: m for n, build in cands.items() if n not in skipped and combinable(m := build())}
            apart.update(_sibling_converted(inf, Sibling(name, new if new is not None else mod, options, key),
                                            group_of[name], waiting, plan, x, budget_s, cold, verbose))
    if fuse and plan:
        inf = fuse_chains(inf, args, plan, budget_s, min_sparsity, verbose, always=fuse == "always")
        inf = fuse_siblings(inf, args, plan, apart)
    with torch.no_grad():
        out = inf(*args)
    # lossy values were checked layer by layer against their own rounding; so were thresholded layers, since a
    # float-order difference upstream can move an input across its threshold, and whole models then differ
    # by that input's product (not by float order)
    if values == "fp32" and not thresholded:
        _check_same(out, ref_out)
    inf.sparsetorch_plan = plan
    _drop_torch_copies(inf)
    use_huge_pages(inf)
    if decode:  # one query token over the KV cache on our kernel: 347 vs 598 us per layer at 2048 cached tokens
        use_packed_decode_attention(inf)
    return compile_decode(inf) if compile else inf


def _drop_torch_copies(model: nn.Module) -> None:
    """Forget the torch sparse tensors that timing a ``torch-csr`` / ``torch-bsr`` candidate cached on a packed
    weight it shared with the compiled candidate that won: a second copy of the weight (8 bytes per kept value,
    841 MiB on a 6-block 1B-preset model at 70%) that nothing reads. Layers on torch's kernels keep theirs."""
    on_torch = {id(m.packed) for m in model.modules() if isinstance(m, PackedLinear) and m._backend == "torch"}
    for m in model.modules():
        if isinstance(m, PackedWeight) and id(m) not in on_torch:
            m._torch_cache = None


def _sibling_converted(inf: nn.Module, sibling: Sibling, group: list[str], waiting: dict[str, Sibling],
                       plan: list[dict], x: torch.Tensor, budget_s: float, cold: bool,
                       verbose: bool) -> dict[str, tuple[nn.Module, str]]:
    """Note a converted member of a sibling group; with the last of them, choose the group's layout. Returns
    what _share_layout replaced."""
    waiting[sibling.name] = sibling
    if all(n in waiting for n in group):
        return _share_layout(inf, [waiting.pop(n) for n in group], plan, x, budget_s, cold, verbose)
    return {}


def _share_layout(inf: nn.Module, siblings: list[Sibling], plan: list[dict], x: torch.Tensor, budget_s: float,
                  cold: bool, verbose: bool) -> dict[str, tuple[nn.Module, str]]:
    """Siblings (Linears fed the same input, each converted alone) put on one layout where their shared call
    (fuse_siblings) is faster than running them apart; their plan rows say so. Returns each moved sibling's
    own choice (layer, kernel), for fuse_siblings to restore should the shared call not be made."""
    layout, layers, times = shared_layout(siblings, x, budget_s, cold)
    if verbose and times:
        print("+".join(s.name for s in siblings) + f": {layout or 'apart'}  "
              + "  ".join(f"{k}={v * 1e3:.3f}ms" for k, v in times.items()))
    rows = {row["layer"]: row for row in plan}
    own = {}
    for s in siblings:
        row = rows[s.name]
        if times:
            row["siblings_ms"] = {k: v * 1e3 for k, v in times.items()}
        if layout is not None:
            own[s.name] = (s.chosen, row["kernel"])
            inf.set_submodule(s.name, layers[s.name])
            row["kernel"] = layout
    return own


def _column_layer(mod: nn.Linear, threshold: float, values: str, layout: type = ColumnBitmaskWeight) -> PackedLinear:
    """The Linear on a column kernel (``layout``: kept values in tiles, or every value in whole columns; without
    the compiled kernels, torch on the same packed weights) with its inputs sparsified at ``threshold``."""
    if mod.weight.dtype != torch.float32 or mod.weight.is_cuda:
        raise SparsityError("activation sparsity runs on CPU float32 models", layer_dtype=str(mod.weight.dtype),
                            device=str(mod.weight.device), fix="model.float().cpu() before to_inference")
    packed = layout.from_dense(mod.weight.detach(), threshold, values)
    kernel = packed.format if has_extension() else "torch-" + packed.format
    return PackedLinear(mod.in_features, mod.out_features, mod.bias, kernel, packed)


def _thresholded_layer(name: str, mod: nn.Linear, threshold: float, values: str, x: torch.Tensor | None,
                       budget_s: float, cold: bool, sibling: bool = False
                       ) -> tuple[nn.Module, str, dict[str, float], dict[str, PackedLinear], tuple]:
    """The fastest of a Linear with inputs sparsified at ``threshold`` on one row of its input: the column kernel
    over the kept values in tiles (``bitmask-columns``), over every value in whole columns (``dense-columns``:
    where, as on AVX2, expanding kept values costs more than their bytes save), or the fastest row kernel behind
    the threshold (``rows/<kernel>``, SparsifiedInputLinear). (layer, kernel name, seconds per call of each, the
    built layers that could share a call with their siblings, the choice's cache key); with ``sibling`` the
    dense columns are built whatever the choice alone, to be timed as the siblings' one call."""
    if x is None or not has_extension():
        column = _column_layer(mod, threshold, values)
        _check_column_layer(name, column, mod, x)
        return column, column.kernel, {}, {}, ()
    row = x.reshape(-1, mod.in_features)[:1].float()
    w = mod.weight.detach()
    structure = detect_structure(w)
    key = ("thresholded", *w.shape, round(float((w != 0).float().mean()), 3), _signature(structure),
           torch.get_num_threads(), extension_isa(), values, cold)
    # which layout wins depends on how many inputs are zeroed too (the bytes the column kernels skip)
    layout_key = ("thresholded-layout", *key, round(float((row.abs() <= threshold).float().mean()), 1))
    decided = KERNEL_CACHE.get(layout_key)
    layers: dict[str, nn.Module] = {}  # built only where they may be chosen
    for fmt, layout in (("bitmask-columns", ColumnBitmaskWeight), ("dense-columns", DenseColumnWeight)):
        if decided in (None, fmt) or (sibling and fmt == "dense-columns"):
            layers[fmt] = _column_layer(mod, threshold, values, layout)
            _check_column_layer(name, layers[fmt], mod, x)
    if decided in (None, "rows"):
        kernel, packed, _, _ = _choose(key, mod, row, _cpu_candidates(w, mod.bias, structure, values), budget_s,
                                       False, cold)
        layers["rows/" + kernel] = SparsifiedInputLinear(threshold, packed if packed is not None else mod)
    times: dict[str, float] = {}
    if decided is None:  # cached like every choice: one process converts alike
        with torch.no_grad():
            times = time_candidates({k: (lambda m=m: m(row)) for k, m in layers.items()}, budget_s, False, cold)
        best = min(times, key=lambda k: times[k])
        decided = KERNEL_CACHE[layout_key] = "rows" if best.startswith("rows/") else best
    kernel = next(k for k in layers if k == decided or (decided == "rows" and k.startswith("rows/")))
    return layers[kernel], kernel, times, {k: m for k, m in layers.items() if combinable(m)}, layout_key


def _check_column_layer(name: str, new: PackedLinear, mod: nn.Linear, x: torch.Tensor | None) -> None:
    """The column layer against torch on the layer's captured (thresholded) input, with its own weight."""
    if x is None:
        return  # not called by the example
    x = x.reshape(-1, mod.in_features)[:8]
    packed = new.packed
    with torch.no_grad():
        ref = F.linear(sparsify_input(x.float(), float(packed.threshold)), packed.to_dense(), mod.bias)
        err = max_error(new(x), ref)
    if err:
        raise SparsityError(f"the column kernel of {name} disagrees with torch; please report this", max_error=err)


def _check_same(a, b) -> None:
    err = max_error(a, b)
    if err:
        raise SparsityError("the converted model disagrees with the dense one; please report this", max_error=err)
