"""Sparse training with Lightning: one callback.

    sparsifier = GMP(sparsity=0.9, ...)                      # not attached yet
    trainer = lightning.Trainer(callbacks=[SparsityCallback(sparsifier)])
    trainer.fit(module, data)                                 # or fit(..., ckpt_path=...)

The callback attaches the sparsifier to the LightningModule and its optimizer when training
starts, steps it once per optimizer step (``trainer.global_step``, so gradient accumulation
counts once), and keeps its state in Lightning checkpoints (``Callback.state_dict``: tensors
and plain data, loadable with ``weights_only=True``).
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..errors import SparsityError
from .training_state import resume_sparsifier

__all__ = ["SparsityCallback"]


class SparsityCallback(Callback):
    """Drive ``sparsifier`` from a ``lightning.Trainer``.

    Args:
        sparsifier: a ``sparsetorch`` Sparsifier, attached or not.
        optimizer_index: which of ``configure_optimizers``'s optimizers trains the masked layers.
    """

    def __init__(self, sparsifier: Any, optimizer_index: int = 0):
        self.sparsifier = sparsifier
        self.optimizer_index = optimizer_index
        self._pending: dict[str, Any] | None = None  # loaded from a checkpoint, applied at train start
        self._seen_step = 0

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) <= self.optimizer_index:
            raise SparsityError(f"optimizer_index={self.optimizer_index} but configure_optimizers returned "
                                f"{len(trainer.optimizers)} optimizer(s)")
        optimizer = trainer.optimizers[self.optimizer_index]
        if self._pending is not None:  # Lightning restored weights and optimizer state already
            resume_sparsifier(self.sparsifier, pl_module, optimizer, self._pending)
            self._pending = None
        elif self.sparsifier.model is None:
            self.sparsifier.attach(pl_module, optimizer)
        elif self.sparsifier.optimizer is None:
            self.sparsifier.optimizer = optimizer  # attached before the optimizer existed
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        while self._seen_step < trainer.global_step:  # no step on accumulation-only batches
            self.sparsifier.step()
            self._seen_step += 1

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier.model is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) or None
