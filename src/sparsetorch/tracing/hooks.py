"""Hooks that last for one block: ``with hooked(m.register_forward_hook(f) for m in mods): model(x)``."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch.utils.hooks import RemovableHandle

__all__ = ["hooked"]


@contextlib.contextmanager
def hooked(handles: Iterable[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """Registers the hooks (the iterable is consumed on entry) and removes every one on the way out, errors
    included, so a failed forward never leaves a model hooked."""
    registered: list[RemovableHandle] = []
    try:
        for handle in handles:
            registered.append(handle)
        yield registered
    finally:
        for handle in registered:
            handle.remove()
