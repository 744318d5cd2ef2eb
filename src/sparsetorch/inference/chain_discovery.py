"""Finding fusable chains: runs of Linear layers (+ elementwise activations) in ``nn.Sequential`` containers
and, through ``torch.fx``, in modules whose forward applies its layers one after another."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["find_sequential_chains", "find_graph_chains", "activation_of", "module_activation", "trace_leaves"]

# The one table of activations a chain fuses, by how the model applies them (GELU: by its approximation).
MODULE_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
FUNCTION_ACTIVATIONS: dict[Callable, str] = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh",
                                             torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
METHOD_ACTIVATIONS: dict[str, str] = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}

# A chain is [(linear name, activation), ...]: each Linear feeds only the next step; identity modules between
# steps (Identity, Dropout: no-ops in eval) are skipped.

_NOOP_MODULES = (nn.Identity, nn.Dropout)


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


def module_activation(mod: nn.Module) -> str | None:
    """The chain activation an activation module computes (None if it is not one we fuse)."""
    if type(mod) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
    return MODULE_ACTIVATIONS.get(type(mod))


def activation_of(node, modules: dict[str, nn.Module]) -> str | None:
    """The chain activation an fx node applies to its only tensor argument (None if not a fusable one)."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        mod = modules.get(node.target)
        return module_activation(mod) if mod is not None else None
    if node.op == "call_function" and len(node.args) == 1:
        kw = dict(node.kwargs)
        kw.pop("inplace", None)
        if node.target is F.gelu and set(kw) <= {"approximate"}:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(kw.get("approximate", "none"))
        return None if kw else FUNCTION_ACTIVATIONS.get(node.target)
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return METHOD_ACTIVATIONS.get(node.target)
    return None


def find_graph_chains(gm, is_linear: Callable[[nn.Module], bool]) -> list[list]:
    """Chains in an fx graph: lists of (linear node, [activation nodes], activation name), in order."""
    modules = dict(gm.named_modules())

    def linear_node(n) -> bool:
        return n.op == "call_module" and is_linear(modules.get(n.target)) and len(n.args) == 1 and not n.kwargs

    def act_of(n) -> str | None:
        return activation_of(n, modules)

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
