"""Sparsifiers in training frameworks, and resumable training state.

* ``save_training_state`` / ``load_training_state``: model, masks, optimizer and sparsifier
  state in safetensors + JSON (no pickle); resuming continues the run bitwise.
* ``sparsetorch.integrations.hf.SparsityCallback``: a transformers ``TrainerCallback``.
* ``sparsetorch.integrations.lightning.SparsityCallback``: a Lightning ``Callback``.

The framework modules import transformers / lightning only when used.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "save_training_state": "state",
    "load_training_state": "state",
    "save_sparsifier_state": "state",
    "load_sparsifier_state": "state",
    "unwrap_model": "state",
}
_SUBMODULES = {"state", "hf", "lightning"}

__all__ = [*_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)
