"""Fused chains: consecutive Linear layers (+ elementwise activations) run by one native call.

A small MLP spends most of its time in per-layer overhead (each layer call, each activation, each
allocation costs microseconds in Python while the arithmetic of a 90%-sparse 256x256 layer takes about
one). :class:`FusedChain` runs ``act_L(W_L ... act_1(W_1 x + b_1) ... + b_L)`` in a single call of the
compiled core (csrc/chain.cpp): activations stay in the kernels' transposed panel layout between layers
and never come back to Python.

:func:`find_sequential_chains` and :func:`find_graph_chains` locate such runs in ``nn.Sequential``
containers and (through ``torch.fx``) in modules whose forward applies its layers one after another;
:func:`sparsetorch.to_inference` replaces a run by a FusedChain only where that measured faster.
Without the compiled kernels a FusedChain runs its layers one by one on torch's sparse kernels.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsityError
from ..kernels import inference_ops
from ..kernels.packed import BSRWeight, CSRWeight, DenseWeight, NMWeight, PackedWeight
from .packed_modules import PackedLinear
from .kernel_choice import KERNEL_CACHE, outputs_close, time_candidates

__all__ = ["FusedChain", "ChainStep", "ACTIVATIONS", "find_sequential_chains", "find_graph_chains"]

# activation name -> (code in csrc/chain.h, the torch function it equals)
ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": (0, lambda t: t),
    "relu": (1, torch.relu),
    "gelu": (2, F.gelu),
    "gelu_tanh": (3, lambda t: F.gelu(t, approximate="tanh")),
    "tanh": (4, torch.tanh),
    "sigmoid": (5, torch.sigmoid),
}
_KIND = {"csr": 0, "nm": 1, "bsr": 2, "dense": 3}


@dataclass
class ChainStep:
    """One layer of a chain: its qualified name in the model, dense weight [out, in], bias, activation."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    act: str = "none"


def pack_for_chain(w: torch.Tensor, fmt: str) -> PackedWeight:
    """Pack w as "csr", "nm:N:M", "bsr:RxC" (the kernel names to_inference measures) or "dense"."""
    if fmt == "dense":
        return DenseWeight.from_dense(w)
    if fmt.startswith("nm:"):
        _, n, m = fmt.split(":")
        return NMWeight.from_dense(w, int(n), int(m))
    if fmt.startswith("bsr:"):
        r, c = fmt[4:].split("x")
        return BSRWeight.from_dense(w, int(r), int(c))
    return CSRWeight.from_dense(w)


def _forget_native(module: "FusedChain", incompatible_keys) -> None:
    module._native = None  # load_state_dict may have replaced buffers (assign=True)


class FusedChain(nn.Module):
    """``x [..., in] -> [..., out]`` through every layer of the chain in one compiled call.

    ``threads``: None follows ``torch.get_num_threads()``; 1 keeps the call on the calling thread (faster for
    tiny chains on a shared CPU). The native handle holds the buffers' addresses: it is rebuilt after
    ``.to()`` / ``load_state_dict`` and dropped by copy and pickle.
    """

    def __init__(self, weights: list[PackedWeight], biases: list[torch.Tensor | None], acts: list[str],
                 names: list[str] | None = None, threads: int | None = None):
        super().__init__()
        if not weights or not (len(weights) == len(biases) == len(acts)):
            raise SparsityError("a chain needs one bias (or None) and one activation per weight")
        for a, b in zip(weights, weights[1:]):
            if a.out_features != b.in_features:
                raise SparsityError(f"chain layers do not connect: {a.out_features} outputs into {b.in_features} inputs")
        unknown = [a for a in acts if a not in ACTIVATIONS]
        if unknown:
            raise SparsityError(f"unsupported activation(s) {unknown}; use one of {sorted(ACTIVATIONS)}")
        self.weights = nn.ModuleList(weights)
        for i, b in enumerate(biases):
            self.register_buffer(f"bias{i}", None if b is None else b.detach().to("cpu", torch.float32).contiguous())
        self.acts = list(acts)
        self.names = list(names or [f"layer{i}" for i in range(len(weights))])
        self.in_features, self.out_features = weights[0].in_features, weights[-1].out_features
        self.threads = threads
        self._native = None  # (run, isa level, tile, Chain), False when unavailable, None = not built yet
        self.register_load_state_dict_post_hook(_forget_native)

    @classmethod
    def from_steps(cls, steps: list[ChainStep], formats: list[str] | None = None, threads: int | None = None):
        formats = formats or ["csr"] * len(steps)
        return cls([pack_for_chain(s.weight, f) for s, f in zip(steps, formats)], [s.bias for s in steps],
                   [s.act for s in steps], [s.name for s in steps], threads)

    def biases(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"bias{i}") for i in range(len(self.acts))]

    # ------------------------------------------------------------------ native handle
    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: buffers move, addresses change
        self._native = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_native"] = None
        return state

    def _build(self):
        if not inference_ops.available() or any(w.values.device.type != "cpu" for w in self.weights):
            self._native = False
            return False
        specs = []
        for w, b, act in zip(self.weights, self.biases(), self.acts):
            if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
                raise SparsityError("FusedChain biases must be contiguous float32")
            specs.append((_KIND[w.format], ACTIVATIONS[act][0], 0 if b is None else b.data_ptr(), *w._static()))
        widest = max(max(w.in_features, w.out_features) for w in self.weights)
        chain = inference_ops.make_chain(specs)
        self._native = (chain.run, inference_ops.isa_level(), inference_ops.chain_tile(widest), chain)
        return self._native

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        native = self._native if self._native is not None else self._build()
        if native and x.dtype is torch.float32 and x.is_contiguous() and x.is_cpu and x.dim() == 2 \
                and x.shape[1] == self.in_features:  # hot path: these checks and one native call
            n = x.shape[0]
            y = torch.empty(n, self.out_features)
            native[0](native[1], self.threads or torch.get_num_threads(), native[2], x.data_ptr(), n, self.in_features,
                      y.data_ptr())
            return y
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if native and x.is_cpu:
            x2 = x2.float()
            if x2.stride(1) != 1 or x2.stride(0) < self.in_features:
                x2 = x2.contiguous()
            y = torch.empty(x2.shape[0], self.out_features)
            native[0](native[1], self.threads or torch.get_num_threads(), native[2], x2.data_ptr(), x2.shape[0],
                      x2.stride(0), y.data_ptr())
        else:
            y = self.run_layers(x2)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The same result layer by layer on torch's sparse kernels (the path without the extension)."""
        y = x.float()
        for w, b, act in zip(self.weights, self.biases(), self.acts):
            y = ACTIVATIONS[act][1](w.linear(y, b, backend="torch"))
        return y

    def extra_repr(self) -> str:
        layers = ", ".join(f"{n}[{w.format} {w.out_features}x{w.in_features}]" + ("" if a == "none" else f"+{a}")
                           for n, w, a in zip(self.names, self.weights, self.acts))
        threads = "" if self.threads is None else f", threads={self.threads}"
        return layers + threads


# ---------------------------------------------------------------------------------------------- detection
# A chain is [(linear name, activation), ...]: each Linear feeds only the next step; identity modules between
# steps (Identity, Dropout: no-ops in eval) are skipped.

_NOOP_MODULES = (nn.Identity, nn.Dropout)


def module_activation(mod: nn.Module) -> str | None:
    """The chain activation an activation module computes (None if it is not one we fuse)."""
    if type(mod) is nn.ReLU:
        return "relu"
    if type(mod) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
    if type(mod) is nn.Tanh:
        return "tanh"
    if type(mod) is nn.Sigmoid:
        return "sigmoid"
    return None


def find_sequential_chains(seq: nn.Sequential, is_linear: Callable[[nn.Module], bool]) -> list[list[tuple[str, str]]]:
    """Runs of [(child name, activation)] in ``seq``'s children (at least two operations each)."""
    chains, cur = [], []
    pending_act = False  # the last step of cur already has its activation

    def close():
        nonlocal cur, pending_act
        if len(cur) > 1 or (cur and cur[-1][1] != "none"):
            chains.append(cur)
        cur, pending_act = [], False

    for name, mod in seq.named_children():
        if is_linear(mod):
            cur.append((name, "none"))
            pending_act = False
        elif cur and not pending_act and module_activation(mod):
            cur[-1] = (cur[-1][0], module_activation(mod))
            pending_act = True
        elif cur and isinstance(mod, _NOOP_MODULES):
            continue
        else:
            close()
    close()
    return chains


def _function_activation(node) -> str | None:
    """Activation of an fx node applied to its only tensor argument (None if not a fusable activation)."""
    if node.op == "call_function":
        t, kw = node.target, dict(node.kwargs)
        kw.pop("inplace", None)
        if len(node.args) != 1:
            return None
        if t in (torch.relu, F.relu) and not kw:
            return "relu"
        if t is F.gelu and set(kw) <= {"approximate"}:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(kw.get("approximate", "none"))
        if t in (torch.tanh, F.tanh) and not kw:
            return "tanh"
        if t in (torch.sigmoid, F.sigmoid) and not kw:
            return "sigmoid"
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}.get(node.target)
    return None


def find_graph_chains(gm, is_linear: Callable[[nn.Module], bool]) -> list[list]:
    """Chains in an fx graph: lists of (linear node, [activation nodes], activation name), in order."""
    modules = dict(gm.named_modules())

    def linear_node(n) -> bool:
        return n.op == "call_module" and is_linear(modules.get(n.target)) and len(n.args) == 1 and not n.kwargs

    def act_of(n) -> str | None:
        if n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
            mod = modules.get(n.target)
            return module_activation(mod) if mod is not None else None
        return _function_activation(n)

    def only_user(n):
        users = list(n.users)
        return users[0] if len(users) == 1 else None

    used, chains = set(), []
    for node in gm.graph.nodes:
        if node in used or not linear_node(node):
            continue
        chain, cur = [], node
        while cur is not None and linear_node(cur) and cur not in used:
            step_nodes, act = [cur], "none"
            nxt = only_user(cur)
            if nxt is not None and nxt.args and nxt.args[0] is cur and act_of(nxt):
                act = act_of(nxt)
                step_nodes.append(nxt)
                nxt = only_user(nxt)
            chain.append((step_nodes, act))
            last = step_nodes[-1]
            cur = nxt if (nxt is not None and linear_node(nxt) and nxt.args[0] is last) else None
        if len(chain) > 1 or chain[0][1] != "none":
            chains.append(chain)
            used.update(n for nodes, _ in chain for n in nodes)
    return chains


def trace_leaves(module: nn.Module):
    """fx trace of module's own forward, every submodule except containers kept as one call (or None)."""
    from torch import fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))

    try:
        graph = Tracer().trace(module)
        return fx.GraphModule(module, graph)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no fusion for this module
        return None


def rewrite_graph(gm, chains: list[list], fused: list[nn.Module]) -> None:
    """Replace each chain's nodes in gm by one call of its fused module (added as gm.<first>_to_<last>)."""
    for chain, mod in zip(chains, fused):
        name = f"{chain[0][0][0].target}_to_{chain[-1][0][0].target}".replace(".", "_")
        while hasattr(gm, name):
            name += "_"
        gm.add_module(name, mod)
        first, last = chain[0][0][0], chain[-1][0][-1]
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(name, (first.args[0],))
        last.replace_all_uses_with(new)
        for nodes, _ in reversed(chain):
            for n in reversed(nodes):
                gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()



# ---------------------------------------------------------------------------------------------- the pass


def _chain_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense weight [out, in] and bias of a Linear or of to_inference's PackedLinear."""
    if isinstance(mod, nn.Linear):
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    return mod.packed.to_dense(), mod.bias


def _linear_predicate(min_sparsity: float) -> Callable[[nn.Module], bool]:
    def is_linear(mod) -> bool:
        if isinstance(mod, PackedLinear):
            return mod.packed is not None and mod.kernel in ("csr", "nm", "bsr", "torch-csr", "torch-bsr")
        if type(mod) is not nn.Linear or mod.weight.dtype != torch.float32 or mod.weight.device.type != "cpu":
            return False
        # a large dense layer runs faster on torch's dense matmul than as a full CSR matrix inside a chain
        w = mod.weight
        return w.numel() <= 65536 or float((w == 0).float().mean()) >= min_sparsity
    return is_linear


# Batch 1 inside a chain: a cache-resident layer denser than this runs faster unindexed (a gather costs about
# as much as 13 contiguous multiply-adds); a layer streamed from memory only above the bandwidth break-even.
# Measured with 3-layer 256x256 FusedChain calls, one thread, AMD EPYC Zen 4 (AVX-512): CSR = dense at about
# 7.5% density. Batched, the CSR panel kernel costs the same per nonzero as the dense one per entry, so
# batched chains always use a sparse format (a fully dense layer as CSR).
DENSE_ABOVE_CACHED, DENSE_ABOVE_STREAMED, CACHED_BYTES = 0.08, 0.5, 1 << 20


def _format_for(row: dict | None, w: torch.Tensor, batch: int) -> str:
    """Format of one chain layer: dense when that is faster at batch 1 (see DENSE_ABOVE_*), else the fastest
    compiled sparse format measured for this layer (csr when none was measured)."""
    density = float((w != 0).float().mean())
    limit = DENSE_ABOVE_CACHED if w.numel() * 4 <= CACHED_BYTES else DENSE_ABOVE_STREAMED
    if batch == 1 and density > limit:
        return "dense"
    if not row:
        return "csr"
    ext = {k: v for k, v in row.get("ms", {}).items() if k.split(":")[0] in ("csr", "nm", "bsr") and "/" not in k}
    if ext:
        return min(ext, key=ext.get)
    kernel = row.get("kernel", "csr").split("/")[0]
    return kernel if kernel.split(":")[0] in ("csr", "nm", "bsr") and kernel.count(":") != 1 else "csr"


def _make_fused(mod: nn.Module, prefix: str, chain: list[tuple[str, str]], rows: dict, batch: int) -> FusedChain:
    steps, formats = [], []
    for child, act in chain:
        w, b = _chain_weight(mod.get_submodule(child))
        qual = f"{prefix}.{child}" if prefix else child
        steps.append(ChainStep(qual, w, b, act))
        formats.append(_format_for(rows.get(qual), w, batch))
    return FusedChain.from_steps(steps, formats)


def _fused_sequential(seq: nn.Sequential, prefix: str, rows: dict, is_linear, batch: int
                      ) -> tuple[nn.Module, list] | None:
    """A copy of seq with each chain of its children replaced by one FusedChain (None if there is none)."""
    chains = find_sequential_chains(seq, is_linear)
    if not chains:
        return None
    after = __import__("copy").deepcopy(seq)
    fused = []
    for chain in chains:
        names = [c for c, _ in chain]
        first = list(after._modules).index(names[0])
        last = list(after._modules).index(names[-1])
        module = _make_fused(seq, prefix, chain, rows, batch)
        for key in list(after._modules)[first:last + 1]:  # the chain plus skipped no-op modules between
            del after._modules[key]
        items = list(after._modules.items())
        name = f"{names[0]}_to_{names[-1]}"  # a new name: plan rows and state_dict keys never mix the two
        items.insert(first, (name, module))
        after._modules.clear()
        after._modules.update(items)
        fused.append((name, module))
    return after, fused


def _fused_graph(mod: nn.Module, prefix: str, rows: dict, is_linear, batch: int) -> tuple[nn.Module, list] | None:
    """A copy of mod whose forward (traced with torch.fx) calls one FusedChain per chain (None if none)."""
    import copy
    import types

    after = copy.deepcopy(mod)
    gm = trace_leaves(after)
    if gm is None:
        return None
    chains = find_graph_chains(gm, is_linear)
    if not chains:
        return None
    fused_mods = [_make_fused(after, prefix, [(nodes[0].target, act) for nodes, act in chain], rows, batch)
                  for chain in chains]
    targets = [nodes[0].target for chain in chains for nodes, _ in chain]
    rewrite_graph(gm, chains, fused_mods)
    fused = []
    for name, child in gm.named_children():
        if isinstance(child, FusedChain) and not hasattr(after, name):
            after.add_module(name, child)
            fused.append((name, child))
    for node in gm.graph.nodes:  # constants the trace lifted into attributes
        if node.op == "get_attr" and not _has_path(after, node.target):
            _set_path(after, node.target, _get_path(gm, node.target))
    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in set(targets) - still_called:  # the fused layers' weights now live in the FusedChain only
        _set_path(after, target, nn.Identity()) if "." in target else delattr(after, target)
    after.forward = types.MethodType(type(gm).forward, after)
    return after, fused


def _get_path(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _has_path(root, path) -> bool:
    try:
        _get_path(root, path)
        return True
    except AttributeError:
        return False


def _set_path(root, path, value) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(_get_path(root, parent) if parent else root, attr, value)


def fuse_chains(model: nn.Module, args: tuple, plan: list[dict], budget_s: float, min_sparsity: float,
                verbose: bool = False, always: bool = False) -> nn.Module:
    """Replace runs of Linear (+ activation) in ``model`` by FusedChain modules where that measured faster
    than the layers as they are (per-layer kernels); returns the model (a new object if the root changed).
    Each fused candidate must reproduce the module's output on the example; rows are added to ``plan``.
    ``always``: keep every chain that reproduces the outputs, without timing."""
    import warnings

    from ..errors import SparsityWarning

    if not inference_ops.available():
        return model
    is_linear = _linear_predicate(min_sparsity)
    rows = {r["layer"]: r for r in plan}

    def has_linear_child(m) -> bool:
        kids = list(m.children())
        kids += [g for k in kids if isinstance(k, (nn.ModuleList, nn.ModuleDict)) for g in k.children()]
        return any(is_linear(k) for k in kids)

    candidates = [(n, m) for n, m in model.named_modules()
                  if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and not is_linear(m) and has_linear_child(m)]
    if not candidates:
        return model
    seen: dict[str, tuple] = {}
    handles = []
    for name, mod in candidates:
        def hook(m, a, kw, name=name):
            seen.setdefault(name, (a, kw))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    for name, mod in sorted(candidates, key=lambda nm: -nm[0].count(".") if nm[0] else 1):
        if name not in seen or (name and (not _has_path(model, name) or _get_path(model, name) is not mod)):
            continue  # never called by the example, or inside a module already replaced
        build = _fused_sequential if isinstance(mod, nn.Sequential) else _fused_graph
        mine = [r["batch"] for r in plan if r.get("batch") and (not name or r["layer"].startswith(name + "."))]
        batch = min(mine or [1])  # rows of the example per layer call
        try:
            found = build(mod, name, rows, is_linear, batch)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            warnings.warn(f"{name or type(mod).__name__}: chains not fused ({exc})", SparsityWarning, stacklevel=3)
            continue
        if found is None:
            continue
        after, fused = found
        a, kw = seen[name]
        with torch.no_grad():
            try:
                ok = outputs_close(after(*a, **kw), mod(*a, **kw))
            except Exception:  # noqa: BLE001 - a forward that used the replaced children by name
                ok = False
            if not ok:
                continue
            key = ("chain", tuple((w.format, w.out_features, w.in_features, w.nnz, act) for _, f in fused
                                  for w, act in zip(f.weights, f.acts)), batch, torch.get_num_threads(),
                   inference_ops.best_isa())
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
            if always:
                times, best = {}, "fused"
            else:
                times = {} if key in KERNEL_CACHE else time_candidates(fns, budget_s, cuda=False)
                best = KERNEL_CACHE[key] if key in KERNEL_CACHE else min(times, key=times.get)
                KERNEL_CACHE[key] = best
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
        if verbose:
            print(f"{name or '(model)'} chains: {best}  " + "  ".join(f"{k}={v * 1e3:.3f}ms" for k, v in times.items()))
        if best != "per-layer":
            if name:
                _set_path(model, name, after)
            else:
                after.sparsetorch_plan = plan
                model = after
    return model
