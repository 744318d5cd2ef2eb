"""Finding fusable chains: runs of Linear layers (+ elementwise activations) in ``nn.Sequential`` containers
and, through ``torch.fx``, in modules whose forward applies its layers one after another."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..tracing import TraceFailed, activation_of, module_activation, trace
from .fused_chain import ACTIVATIONS as CHAIN_ACTIVATIONS

__all__ = ["find_sequential_chains", "find_graph_chains", "chain_activation", "trace_leaves"]

# A chain is [(linear name, activation), ...]: each Linear feeds only the next step; identity modules between
# steps (Identity, Dropout: no-ops in eval) are skipped.
_NOOP_MODULES = (nn.Identity, nn.Dropout)


def chain_activation(name: str | None) -> str | None:
    """The activation if the chain kernels implement it (csrc/chain.h), else None: the run stops there."""
    return name if name in CHAIN_ACTIVATIONS else None


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
        elif cur and not pending_act and chain_activation(module_activation(mod)):
            cur[-1] = (cur[-1][0], chain_activation(module_activation(mod)))
            pending_act = True
        elif cur and isinstance(mod, _NOOP_MODULES):
            continue
        else:
            close()
    close()
    return chains


def find_graph_chains(gm, is_linear: Callable[[nn.Module], bool]) -> list[list]:
    """Chains in an fx graph: lists of (linear node, [activation nodes], activation name), in order."""
    modules = dict(gm.named_modules())

    def linear_node(n) -> bool:
        return n.op == "call_module" and is_linear(modules.get(n.target)) and len(n.args) == 1 and not n.kwargs

    def act_of(n) -> str | None:
        return chain_activation(activation_of(n, modules))

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
    try:
        return trace(module, all_leaves=True)
    except TraceFailed:  # data-dependent control flow etc.: no fusion for this module
        return None
