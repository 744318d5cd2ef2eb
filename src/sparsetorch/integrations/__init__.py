"""Sparsifiers in training frameworks, and resumable training state.

* ``save_training_state`` / ``load_training_state``: model, masks, optimizer and sparsifier
  state in safetensors + JSON (no pickle); resuming continues the run bitwise.
* ``save_distributed_state`` / ``load_distributed_state``: the same through torch.distributed.checkpoint,
  sharded under FSDP2, reshardable to another world size.
* ``sparsetorch.integrations.hf.SparsityCallback``: a transformers ``TrainerCallback``.
* ``sparsetorch.integrations.lightning.SparsityCallback``: a Lightning ``Callback``.

The framework modules import transformers / lightning only when used.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "save_training_state": "training_state",
    "load_training_state": "training_state",
    "save_sparsifier_state": "training_state",
    "load_sparsifier_state": "training_state",
    "unwrap_model": "training_state",
    "save_distributed_state": "distributed_checkpoint",
    "load_distributed_state": "distributed_checkpoint",
}
_SUBMODULES = {"training_state", "distributed_checkpoint", "hf", "lightning"}

__all__ = [*_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)
