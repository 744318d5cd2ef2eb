"""Sparsifiers in training frameworks, and resumable training state.

* ``save_training_state`` / ``load_training_state``: model, masks, optimizer and sparsifier
  state in safetensors + JSON (no pickle); resuming continues the run bitwise.
* ``sparsetorch.integrations.hf.SparsityCallback``: a transformers ``TrainerCallback``.
* ``sparsetorch.integrations.lightning.SparsityCallback``: a Lightning ``Callback``.

The framework modules import transformers / lightning only when used.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "save_training_state": "state",
    "load_training_state": "state",
    "save_sparsifier_state": "state",
    "load_sparsifier_state": "state",
    "unwrap_model": "state",
}
_SUBMODULES = {"state", "hf", "lightning"}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sparsetorch.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
