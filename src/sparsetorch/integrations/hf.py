"""Sparse training with the Hugging Face ``Trainer``: one callback.

    sparsifier = GMP(sparsity=0.9, ...)                     # not attached yet
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsityCallback(sparsifier)])
    trainer.train()                                          # or train(resume_from_checkpoint=True)

The callback attaches the sparsifier to the trainer's model and optimizer when training
begins, steps it after every optimizer step (gradient accumulation counts once), writes
``sparsifier.safetensors`` into every checkpoint folder, and restores it when the Trainer
resumes from a checkpoint (or loads the best one at the end of training).

Recovery fine-tuning of a one-shot pruned model needs no sparsifier: ``SparsityCallback()`` checks that the
model's masks are in place (registering them from the zeros where a loaded model has none) so no optimizer
step revives a pruned weight, and for a PEFT LoRA model it makes the adapters train through the masks::

    model = sparsetorch.recovery.add_lora(pruned, r=8)      # or peft.get_peft_model(pruned, LoraConfig(...))
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsityCallback()]).train()
    sparse = sparsetorch.recovery.merge_lora(model)        # same masks, same N:M, zeros exact
"""
from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ..errors import SparsityError
from .training_state import inner_optimizer, load_sparsifier_state, resume_sparsifier, save_sparsifier_state, unwrap_model

__all__ = ["SparsityCallback", "STATE_FILE", "keep_masks"]

STATE_FILE = "sparsifier.safetensors"


def keep_masks(model) -> int:
    """Masks for training a pruned model without a sparsifier: every Linear-like layer holding zeros and no mask
    gets one from its zeros; LoRA adapters (PEFT) are made to train through their base layer's mask. Returns the
    number of masked layers; none at all is an error (nothing would stay sparse)."""
    from ..core.masks import iter_masks
    from ..oneshot.linear_layers import mask_zeros

    mask_zeros(model)
    if any(type(m).__name__ == "LoraLayer" or hasattr(m, "lora_A") for m in model.modules()):
        from ..recovery.lora import mask_adapters

        mask_adapters(model)
    count = len(list(iter_masks(model)))
    if count == 0:
        raise SparsityError("SparsityCallback() without a sparsifier keeps an existing sparsity, but this model has "
                            "no masks and no zero weights; prune it first or pass a sparsifier")
    return count


class SparsityCallback(TrainerCallback):
    """Drive ``sparsifier`` from a ``transformers.Trainer``.

    Args:
        sparsifier: a ``sparsetorch`` Sparsifier, attached or not; None keeps the model's existing sparsity
            (one-shot pruned, or a PEFT model on one: see ``keep_masks``).
        resume_from: the checkpoint folder to restore the sparsifier from when resuming; by
            default ``<output_dir>/checkpoint-<global step>``, which is what
            ``trainer.train(resume_from_checkpoint=True)`` or a path in ``output_dir`` loads.
    """

    def __init__(self, sparsifier: Any = None, resume_from: str | os.PathLike | None = None):
        self.sparsifier = sparsifier
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparsifier is None:
            if model is None:
                raise SparsityError("SparsityCallback needs the Trainer's model at on_train_begin")
            keep_masks(unwrap_model(model))
            return
        if model is None or optimizer is None:
            raise SparsityError("SparsityCallback needs the Trainer's model and optimizer at on_train_begin")
        model, optimizer = unwrap_model(model), inner_optimizer(optimizer)
        if state.global_step > 0:  # the Trainer restored weights and optimizer from a checkpoint
            resume_sparsifier(self.sparsifier, model, optimizer, load_sparsifier_state(self._checkpoint_file(args, state)))
        elif self.sparsifier.model is None:
            self.sparsifier.attach(model, optimizer)
        elif self.sparsifier.optimizer is None:
            self.sparsifier.optimizer = optimizer  # attached before the Trainer built its optimizer

    def on_step_end(self, args, state, control, **kwargs):
        if self.sparsifier is not None:
            self.sparsifier.step()

    def on_save(self, args, state, control, **kwargs):
        if self.sparsifier is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_sparsifier_state(os.path.join(folder, STATE_FILE), self.sparsifier)

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        if self.sparsifier is None:
            return
        if args.load_best_model_at_end and best is not None and self.sparsifier.model is not None:
            # the Trainer just loaded the best checkpoint's weights: give them that checkpoint's masks
            path = os.path.join(best, STATE_FILE)
            if not os.path.isfile(path):
                raise SparsityError(f"the Trainer loaded the best checkpoint {best}, which has no {STATE_FILE}; "
                                    "its masks are unknown", path=path)
            self.sparsifier.load_state_dict(load_sparsifier_state(path))

    def _checkpoint_file(self, args, state) -> str:
        folder = self.resume_from
        if folder is None and isinstance(args.resume_from_checkpoint, str):
            folder = args.resume_from_checkpoint
        if folder is None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise SparsityError(
                f"resuming at step {state.global_step} but {path} does not exist; without it the masks would be "
                "lost. Pass SparsityCallback(sparsifier, resume_from=<checkpoint folder>) or resume from a "
                "checkpoint saved with the callback",
                path=path,
            )
        return path
