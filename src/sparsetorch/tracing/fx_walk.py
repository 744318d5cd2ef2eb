"""The one way the library symbolically traces a model with torch.fx, and the error when it cannot."""
from __future__ import annotations

from torch import fx, nn

from ..errors import SparsityError

__all__ = ["trace", "TraceFailed", "CONTAINERS"]


class TraceFailed(SparsityError):
    """torch.fx could not trace the model (the message says why; usually data-dependent Python control flow)."""


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _LeafTracer(fx.Tracer):
    def __init__(self, extra_leaves: tuple[type, ...], all_leaves: bool):
        super().__init__()
        self.extra_leaves, self.all_leaves = extra_leaves, all_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.all_leaves:
            return not isinstance(m, CONTAINERS)
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, *, extra_leaves: tuple[type, ...] = (), all_leaves: bool = False) -> fx.GraphModule:
    """``module``'s forward as an fx GraphModule. Submodules kept as one call: torch's nn layers and
    ``extra_leaves`` (by default), or every submodule but containers (``all_leaves``: only this module's
    own forward is traced). Raises TraceFailed with fx's reason."""
    try:
        graph = _LeafTracer(tuple(extra_leaves), all_leaves).trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TraceFailed(f"torch.fx symbolic_trace failed on {type(module).__name__} ({type(exc).__name__}: "
                          f"{first}); the forward must not branch on tensor values") from None
    return fx.GraphModule(module, graph)
