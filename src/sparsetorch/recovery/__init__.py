"""Win back what pruning cost without losing the sparsity: distillation from the dense model, sparse LoRA.

    student = copy.deepcopy(dense); prune_oneshot(student, calib, method="sparsegpt", sparsity=0.5)
    result = distill(student, dense, windows, steps=200)        # masks stay exact through every step
    peft_model = add_lora(student, r=8); distill(peft_model, dense, windows, steps=200)
    sparse = merge_lora(peft_model)                             # merged through the mask: same sparsity, same N:M

Submodules: ``losses`` (pure loss functions and the :class:`DistillLoss` object), ``teacher_cache`` (teacher
logits on disk), ``loop`` (the distillation loop, resumable), ``lora`` (PEFT adapters merged through the masks).
"""
from __future__ import annotations

from .loop import DistillResult, distill
from .losses import DistillLoss, hidden_state_loss, logit_kl
from .lora import add_lora, merge_lora
from .teacher_cache import TeacherCache

__all__ = ["distill", "DistillResult", "DistillLoss", "logit_kl", "hidden_state_loss", "TeacherCache", "add_lora",
           "merge_lora"]
