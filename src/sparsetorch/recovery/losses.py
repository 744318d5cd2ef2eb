"""Distillation losses as pure functions, and :class:`DistillLoss`, the object a user's own loop calls.

``logit_kl`` is Hinton et al. 2015 (arXiv 1503.02531): KL(teacher || student) of the softmaxes at temperature
T, scaled by T^2 so its gradients keep their size as T changes. ``hidden_state_loss`` matches block outputs
(Minitron, arXiv 2407.14679, distils hidden states as well as logits): mean squared error normalised by the
teacher's mean square, so blocks of different scale weigh the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SparsityError

__all__ = ["logit_kl", "hidden_state_loss", "next_token_loss", "DistillLoss"]


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over positions; logits [..., vocab]."""
    if student.shape != teacher.shape:
        raise SparsityError("student and teacher logits differ in shape; distil from a teacher with the same "
                            "vocabulary", student=tuple(student.shape), teacher=tuple(teacher.shape))
    t = float(temperature)
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||h_s - h_t||^2 / ||h_t||^2 (each block's output, [B, T, C])."""
    if len(student) != len(teacher) or not student:
        raise SparsityError(f"hidden-state matching needs the same number of blocks in student and teacher, got "
                            f"{len(student)} and {len(teacher)}")
    if any(s.shape != t.shape for s, t in zip(student, teacher)):
        raise SparsityError(f"hidden-state matching needs block outputs of the same shape, got "
                            f"{tuple(student[0].shape)} (student) and {tuple(teacher[0].shape)} (teacher); a student "
                            "whose hidden size was cut by sparsetorch.shrink.remove_hidden is matched on its kept channels")
    terms = [(s.float() - t.float()).square().mean() / t.float().square().mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The causal LM loss: position t predicts token t+1; logits [B, T, V], ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@dataclass
class DistillLoss:
    """kl * logit_kl + task * next-token loss + hidden * hidden_state_loss.

    Call it with the student's logits, the teacher's logits, the token ids (for the task term) and, when
    ``hidden > 0``, both models' block outputs; it returns the total and a dict of the parts (floats).
    """

    temperature: float = 1.0
    kl: float = 1.0
    task: float = 0.0
    hidden: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SparsityError(f"temperature must be > 0, got {self.temperature}")
        weights = {"kl": self.kl, "task": self.task, "hidden": self.hidden}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise SparsityError(f"loss weights must be >= 0 with at least one > 0, got {weights}")

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, ids: torch.Tensor,
                 student_hidden: list[torch.Tensor] | None = None,
                 teacher_hidden: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        total = student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if self.kl > 0:
            kl = logit_kl(student_logits, teacher_logits, self.temperature)
            total, parts["kl"] = total + self.kl * kl, float(kl.detach())
        if self.task > 0:
            task = next_token_loss(student_logits, ids)
            total, parts["task"] = total + self.task * task, float(task.detach())
        if self.hidden > 0:
            if student_hidden is None or teacher_hidden is None:
                raise SparsityError("DistillLoss(hidden>0) needs both models' block outputs")
            hid = hidden_state_loss(student_hidden, teacher_hidden)
            total, parts["hidden"] = total + self.hidden * hid, float(hid.detach())
        parts["total"] = float(total.detach())
        return total, parts

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.hidden > 0
