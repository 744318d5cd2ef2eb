"""``sparsetorch.recipes.recover``: one-shot prune -> recover (distil, sparse LoRA or fine-tune) -> save, in one call.

    report = recover(model, calibration, windows, method="sparsegpt", sparsity=0.5, recovery="distill", steps=200)
    print(report)              # loss of dense / pruned / recovered, sparsity, seconds, peak memory, file size
    pruned = report.model      # masks exact: the sparsity is what it was right after pruning, to the bit

The dense ``model`` is the teacher and is left unchanged; the student is a deep copy of it.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.masks import iter_masks
from ..core.rng import resolve_generator
from ..errors import SparsityError
from ..recovery.loop import distill
from ..recovery.losses import DistillLoss, next_token_loss
from ..recovery.teacher_cache import model_logits

RECOVERIES = ("distill", "lora", "finetune", "none")

__all__ = ["recover", "RecoveryReport", "StageRecord", "eval_loss", "PeakRSS", "RECOVERIES"]


class PeakRSS:
    """Context manager sampling this process's resident memory every ``interval`` s: ``.peak_mb`` once it exits.

    The process-wide ``ru_maxrss`` only grows, so a stage after a heavier one could not be measured with it."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _now(self) -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page / 2**20
        except OSError:  # not Linux: the lifetime peak is the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._now())

    def __enter__(self) -> "PeakRSS":
        self.peak_mb = self._now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._now())


@dataclass
class StageRecord:
    """One row of the summary: the model after a stage."""

    stage: str
    loss: float
    sparsity: float
    seconds: float = 0.0
    peak_mb: float = 0.0


@dataclass
class RecoveryReport:
    """What :func:`recover` did; ``print(report)`` shows the summary table."""

    model: nn.Module
    stages: list[StageRecord] = field(default_factory=list)
    recovery: str = "distill"
    tokens: int = 0
    file: Path | None = None
    file_bytes: int = 0
    dense_bytes: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def dense_loss(self) -> float:
        return self.stages[0].loss

    @property
    def recovered_fraction(self) -> float:
        """Share of the pruning's loss increase won back (1 = back to dense)."""
        dense, pruned, final = self.stages[0].loss, self.stages[1].loss, self.stages[-1].loss
        return (pruned - final) / (pruned - dense) if pruned > dense else 1.0

    def note_file(self, path: str | os.PathLike) -> None:
        """Record the file the recovered model was written to (its size goes in the summary)."""
        self.file = Path(path)
        self.file_bytes = self.file.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {"recovery": self.recovery, "tokens": self.tokens, "file": str(self.file) if self.file else None,
                "file_bytes": self.file_bytes, "dense_bytes": self.dense_bytes, "recovered_fraction": self.recovered_fraction,
                "stages": [vars(s) for s in self.stages]}

    def __str__(self) -> str:
        dense = self.stages[0].loss
        lines = [f"{'stage':12s} {'loss':>8s} {'vs dense':>9s} {'sparsity':>8s} {'seconds':>8s} {'peak MB':>8s}"]
        for s in self.stages:
            cost = (f"{s.seconds:8.1f} {s.peak_mb:8.0f}" if s.stage != "dense" else f"{'-':>8s} {'-':>8s}")
            lines.append(f"{s.stage:12s} {s.loss:8.4f} {s.loss - dense:+9.4f} {s.sparsity:8.4f} {cost}")
        tail = [] if self.recovery == "none" else [
            f"{self.recovery}: {self.tokens} tokens, {100 * self.recovered_fraction:.0f}% of the pruning loss won back"]
        if self.file:
            tail.append(f"wrote {self.file}: {self.file_bytes / 1024:.1f} KiB, {self.file_bytes / self.dense_bytes:.2f}x "
                        f"the dense fp32 tensors ({self.dense_bytes / 1024:.1f} KiB)")
        lines += ["; ".join(tail)] if tail else []
        return "\n".join(lines)


def eval_loss(model: nn.Module, data: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` on ``data`` [N, T]."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, data.shape[0], batch_size):
            ids = data[i : i + batch_size].to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(next_token_loss(model_logits(model, ids).float(), ids)) * n
            count += n
    model.train(was)
    return total / count


def _masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {item.fqn: item.mask.clone() for item in iter_masks(model)}


def _sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def _as_rows(data: Any, what: str) -> torch.Tensor:
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor):
        data = torch.cat([d.reshape(1, -1) if d.dim() == 1 else d for d in data])
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point() or data.shape[1] < 2:
        raise SparsityError(f"{what} must be token ids [rows, tokens] (at least 2 tokens per row) or a list of "
                            "[1, tokens] tensors, e.g. sparsetorch.data.text.random_windows(...)",
                            got=getattr(data, "shape", type(data)))
    return data.long()


def _split_eval(train: torch.Tensor, eval_data: Any, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if eval_data is not None:
        return train, _as_rows(eval_data, "eval_data")
    if train.shape[0] < 2:
        raise SparsityError("recover holds out a tenth of train_data to measure the loss, so it needs at least 2 "
                            "rows; pass more rows or eval_data")
    perm = torch.randperm(train.shape[0], generator=generator)
    held = max(1, train.shape[0] // 10)
    return train[perm[held:]], train[perm[:held]]


def recover(model: nn.Module, calibration: Any, train_data: Any, *, method: str = "sparsegpt",
            sparsity: float | None = 0.5, pattern: str = "unstructured", recovery: str = "distill",
            steps: int = 200, batch_size: int = 8, lr: float | None = None, loss: DistillLoss | None = None,
            lora_rank: int = 16, eval_data: Any = None, out: str | os.PathLike | None = None,
            generator: torch.Generator | None = None, progress: bool = True,
            oneshot: dict[str, Any] | None = None) -> RecoveryReport:
    """Prune a copy of ``model`` in one shot from ``calibration``, recover it on ``train_data`` and save it.

    ``recovery``: "distill" (logit KL from the dense ``model``, see :class:`DistillLoss`), "lora" (PEFT LoRA
    adapters of rank ``lora_rank`` trained by distillation through the masks, then merged: same sparsity, same
    N:M), "finetune" (the plain next-token loss, no teacher) or "none". ``lr`` defaults to 1e-4 (1e-3 for LoRA).
    ``eval_data`` ([N, T] ids) measures the loss of each stage; without it a tenth of ``train_data`` is held
    out. ``oneshot`` passes further arguments to :func:`sparsetorch.prune_oneshot` (distribution, permute,
    refine, exclude, ...). With ``out`` the recovered model is written there with :func:`sparsetorch.save`.
    """
    from ..formats.files import save
    from ..oneshot import prune_oneshot

    if recovery not in RECOVERIES:
        raise SparsityError(f"recovery must be one of {RECOVERIES}, got {recovery!r}", recovery=recovery)
    if not isinstance(model, nn.Module):
        raise SparsityError(f"recover takes the dense nn.Module, got {type(model).__name__}")
    gen = resolve_generator(generator)
    train, held = _split_eval(_as_rows(train_data, "train_data"), eval_data, gen)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once, as files hold them
    report = RecoveryReport(model=model, recovery=recovery,
                            dense_bytes=sum(t.numel() * t.element_size() for t in unique.values()))
    teacher = model.eval()

    report.stages.append(StageRecord("dense", eval_loss(teacher, held), 0.0))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        student = copy.deepcopy(teacher)
        prune_oneshot(student, calibration, method=method, sparsity=sparsity, pattern=pattern, progress=progress,
                      **(oneshot or {}))
        seconds = time.perf_counter() - t0
    masks = _masks_of(student)
    if not masks:
        raise SparsityError("prune_oneshot left no masks on the model; nothing to recover")
    report.stages.append(StageRecord(f"{method}", eval_loss(student, held), _sparsity(masks), seconds, mem.peak_mb))

    if recovery != "none":
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            student, result = _train(student, teacher, train, recovery, steps, batch_size, lr, loss, lora_rank,
                                     gen, progress)
            seconds = time.perf_counter() - t0
        report.tokens, report.history = result.tokens, result.history
        after = _masks_of(student)
        if after.keys() != masks.keys() or any(not torch.equal(after[k], masks[k]) for k in masks):
            raise SparsityError("the masks changed during recovery; this is a sparsetorch bug, please report it")
        report.stages.append(StageRecord(recovery, eval_loss(student, held), _sparsity(after), seconds, mem.peak_mb))
    report.model = student
    if out is not None:
        report.note_file(save(student, out, metadata={"recover": {"method": method, "pattern": pattern,
                                                                  "recovery": recovery, "steps": steps}}))
    return report


def _train(student, teacher, train, recovery, steps, batch_size, lr, loss, lora_rank, gen, progress):
    if recovery == "finetune":
        result = distill(student, None, train, steps=steps, batch_size=batch_size, lr=lr or 1e-4,
                         loss=loss or DistillLoss(kl=0.0, task=1.0), generator=gen, progress=progress)
        return student, result
    if recovery == "distill":
        result = distill(student, teacher, train, steps=steps, batch_size=batch_size, lr=lr or 1e-4, loss=loss,
                         generator=gen, progress=progress)
        return student, result
    from ..recovery.lora import add_lora, merge_lora

    adapted = add_lora(student, r=lora_rank, alpha=2.0 * lora_rank, generator=gen)
    result = distill(adapted, teacher, train, steps=steps, batch_size=batch_size, lr=lr or 1e-3, loss=loss,
                     generator=gen, progress=progress)
    return merge_lora(adapted), result
