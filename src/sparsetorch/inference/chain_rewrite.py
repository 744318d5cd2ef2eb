"""Rewriting a module so each chain found in it runs as one FusedChain: in nn.Sequential containers by
replacing children, elsewhere by rewriting the module's fx graph. Each function returns a changed copy."""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from .chain_discovery import find_graph_chains, find_sequential_chains, trace_leaves
from .fused_chain import ChainStep, FusedChain

__all__ = ["fused_sequential", "fused_graph", "rewrite_graph", "format_for", "get_path", "has_path", "set_path"]


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


def chain_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense weight [out, in] and bias of a Linear or of to_inference's PackedLinear."""
    if isinstance(mod, nn.Linear):
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    return mod.packed.to_dense(), mod.bias


# Batch 1 inside a chain: a cache-resident layer denser than this runs faster unindexed (a gather costs about
# as much as 13 contiguous multiply-adds); a layer streamed from memory only above the bandwidth break-even.
# Measured with 3-layer 256x256 FusedChain calls, one thread, AMD EPYC Zen 4 (AVX-512): CSR = dense at about
# 7.5% density. Batched, the CSR panel kernel costs the same per nonzero as the dense one per entry, so
# batched chains always use a sparse format (a fully dense layer as CSR).
DENSE_ABOVE_CACHED, DENSE_ABOVE_STREAMED, CACHED_BYTES = 0.08, 0.5, 1 << 20


def format_for(row: dict | None, w: torch.Tensor, batch: int) -> str:
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


def make_fused(mod: nn.Module, prefix: str, chain: list[tuple[str, str]], rows: dict, batch: int) -> FusedChain:
    steps, formats = [], []
    for child, act in chain:
        w, b = chain_weight(mod.get_submodule(child))
        qual = f"{prefix}.{child}" if prefix else child
        steps.append(ChainStep(qual, w, b, act))
        formats.append(format_for(rows.get(qual), w, batch))
    return FusedChain.from_steps(steps, formats)


def fused_sequential(seq: nn.Sequential, prefix: str, rows: dict, is_linear, batch: int
                      ) -> tuple[nn.Module, list] | None:
    """A copy of seq with each chain of its children replaced by one FusedChain (None if there is none)."""
    chains = find_sequential_chains(seq, is_linear)
    if not chains:
        return None
    after = copy.deepcopy(seq)
    fused = []
    for chain in chains:
        names = [c for c, _ in chain]
        first = list(after._modules).index(names[0])
        last = list(after._modules).index(names[-1])
        module = make_fused(seq, prefix, chain, rows, batch)
        for key in list(after._modules)[first:last + 1]:  # the chain plus skipped no-op modules between
            del after._modules[key]
        items = list(after._modules.items())
        name = f"{names[0]}_to_{names[-1]}"  # a new name: plan rows and state_dict keys never mix the two
        items.insert(first, (name, module))
        after._modules.clear()
        after._modules.update(items)
        fused.append((name, module))
    return after, fused


def fused_graph(mod: nn.Module, prefix: str, rows: dict, is_linear, batch: int) -> tuple[nn.Module, list] | None:
    """A copy of mod whose forward (traced with torch.fx) calls one FusedChain per chain (None if none)."""
    after = copy.deepcopy(mod)
    gm = trace_leaves(after)
    if gm is None:
        return None
    chains = find_graph_chains(gm, is_linear)
    if not chains:
        return None
    fused_mods = [make_fused(after, prefix, [(nodes[0].target, act) for nodes, act in chain], rows, batch)
                  for chain in chains]
    targets = [nodes[0].target for chain in chains for nodes, _ in chain]
    rewrite_graph(gm, chains, fused_mods)
    fused = []
    for name, child in gm.named_children():
        if isinstance(child, FusedChain) and not hasattr(after, name):
            after.add_module(name, child)
            fused.append((name, child))
    for node in gm.graph.nodes:  # constants the trace lifted into attributes
        if node.op == "get_attr" and not has_path(after, node.target):
            set_path(after, node.target, get_path(gm, node.target))
    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in set(targets) - still_called:  # the fused layers' weights now live in the FusedChain only
        set_path(after, target, nn.Identity()) if "." in target else delattr(after, target)
    after.forward = types.MethodType(type(gm).forward, after)
    return after, fused


def get_path(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def has_path(root, path) -> bool:
    try:
        get_path(root, path)
        return True
    except AttributeError:
        return False


def set_path(root, path, value) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, attr, value)
