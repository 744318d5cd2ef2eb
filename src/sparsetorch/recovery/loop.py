"""The recovery loop: a pruned student learns from its dense teacher (or from the data alone), masks kept exact.

The student's masks (``set_mask``, as every one-shot method leaves them) keep pruned weights zero through
every optimizer step: the gradient hook and the optimizer post-step hook of ``core.masks`` hold for any
optimizer, gradient clipping, bf16 autocast, gradient accumulation and DDP. This loop adds what recovery
needs around them: the teacher run under ``torch.inference_mode`` (or read from a :class:`TeacherCache`),
a warm-up + cosine learning rate, and checkpoints that resume bitwise (same data order, same RNG).

``loss=DistillLoss(kl=0, task=1)`` with ``teacher=None`` is plain fine-tuning on the task loss: the baseline
distillation is measured against, through the same loop.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.rng import resolve_generator
from ..errors import SparsityError
from ..integrations.training_state import STATE_FILE, load_training_state, save_training_state, unwrap_model
from ..oneshot.blocks import find_blocks
from .losses import DistillLoss
from .teacher_cache import TeacherCache, model_logits

__all__ = ["distill", "DistillResult", "batch_rows", "lr_factor"]


@dataclass
class DistillResult:
    """What a run did: per-step loss parts, its wall time and the tokens it trained on."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0)))


def batch_rows(step: int, micro: int, rows: int, batch: int, accumulate: int, seed: int) -> torch.Tensor:
    """Row indices of micro-batch ``micro`` of ``step``: a fresh permutation of all rows per epoch, drawn from
    ``seed`` + epoch, so any step's batch is known without replaying the ones before (bitwise resume)."""
    start = (step * accumulate + micro) * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), rows)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out)


class _BlockOutputs:
    """Forward hooks that record each block's output tensor (the first, for blocks returning tuples)."""

    def __init__(self, model: nn.Module, only: list[int] | None = None, channels: torch.Tensor | None = None):
        found = find_blocks(model)
        self.channels = channels
        if found is None:
            raise SparsityError(f"hidden-state matching needs a stack of blocks; none found in {type(model).__name__}")
        self.outputs: list[torch.Tensor] = []
        blocks = list(found[1]) if only is None else [found[1][i] for i in only]
        self.hooks = [b.register_forward_hook(self._record) for b in blocks]

    def _record(self, _module, _args, out) -> None:
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.outputs.append(out if self.channels is None else out[..., self.channels.to(out.device)])

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _kept_blocks(student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """For a depth-pruned student (``shrink.remove_blocks``), the teacher blocks its blocks correspond to."""
    removed = getattr(student, "sparsetorch_removed_blocks", None)
    found = find_blocks(teacher)
    if not removed or found is None:
        return None
    kept = [i for i in range(len(found[1])) if i not in set(removed["removed"])]
    return kept if len(kept) == len(find_blocks(student)[1]) else None


def _kept_channels(student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
    """For a student whose hidden size was cut (``shrink.remove_hidden``), the teacher channels it kept (Minitron
    matches the student's residual stream against those)."""
    emb = getattr(teacher, "get_input_embeddings", None)
    steps = [e["removed"] for e in getattr(student, "sparsetorch_width_removed", []) if e.get("kind") == "hidden"]
    if not steps or not callable(emb):
        return None
    kept = torch.arange(emb().weight.shape[1])
    for removed in steps:
        mask = torch.ones(len(kept), dtype=torch.bool)
        mask[removed] = False
        kept = kept[mask]
    return kept if len(kept) == student.get_input_embeddings().weight.shape[1] else None


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def distill(student: nn.Module, teacher: nn.Module | None, data: torch.Tensor, *, steps: int, batch_size: int = 8,
            lr: float = 1e-4, loss: DistillLoss | None = None, optimizer: torch.optim.Optimizer | None = None,
            teacher_cache: TeacherCache | str | os.PathLike | None = None, warmup: float = 0.05,
            clip: float | None = 1.0, accumulate: int = 1, autocast: torch.dtype | None = None,
            generator: torch.Generator | None = None, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 0, progress: bool = False) -> DistillResult:
    """Train ``student`` for ``steps`` optimizer steps on ``data`` ([N, T] token ids) against ``teacher``.

    Each step averages ``accumulate`` micro-batches of ``batch_size`` rows (split across ranks under
    torch.distributed). The optimizer defaults to AdamW(lr, betas=(0.9, 0.95)) over the trainable parameters.
    With ``checkpoint``, the training state (model, optimizer, step, data-order seed, RNG) is written there
    every ``checkpoint_every`` steps and at the end, and a run given a folder that holds one resumes from it:
    the result is bitwise that of an uninterrupted run. Returns a :class:`DistillResult`.
    """
    loss = loss if loss is not None else DistillLoss()
    data = _check_data(data)
    if steps < 1 or batch_size < 1 or accumulate < 1:
        raise SparsityError("steps, batch_size and accumulate must be positive",
                            steps=steps, batch_size=batch_size, accumulate=accumulate)
    cache = _open_cache(teacher_cache, data, loss)
    if loss.needs_teacher and teacher is None and cache is None:
        raise SparsityError("this loss distils from a teacher: pass the dense teacher model or a teacher_cache, or "
                            "use DistillLoss(kl=0, task=1) for plain fine-tuning")
    rank, world = _rank_world()
    if batch_size % world:
        raise SparsityError(f"batch_size {batch_size} does not split over {world} ranks; use a multiple of {world}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SparsityError("the student has no trainable parameters")
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    seed = int(torch.randint(0, 2**62, (1,), generator=resolve_generator(generator)))
    result, first = DistillResult(steps=steps), 0
    if checkpoint is not None and (Path(checkpoint) / STATE_FILE).is_file():
        extra = load_training_state(student, checkpoint, optimizer)
        first, seed, result.history, result.tokens = extra["step"], extra["seed"], list(extra["history"]), extra["tokens"]
        torch.set_rng_state(extra["rng"])
    warm = max(1, int(warmup * steps)) if warmup > 0 else 0
    device = next(iter(params)).device
    t0 = time.perf_counter()
    with ExitStack() as stack:
        hidden_s = hidden_t = None
        if loss.hidden > 0:
            if cache is not None:
                raise SparsityError("hidden-state matching needs the live teacher; a teacher cache holds logits only")
            hidden_s = _BlockOutputs(unwrap_model(student))
            hidden_t = _BlockOutputs(teacher, _kept_blocks(unwrap_model(student), teacher),
                                     _kept_channels(unwrap_model(student), teacher))
            stack.callback(hidden_s.close)
            stack.callback(hidden_t.close)
        if teacher is not None:
            was_training = teacher.training
            teacher.eval()
            stack.callback(teacher.train, was_training)
        student.train()
        bar = _progress(progress, steps, first)
        for step in range(first, steps):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(step, steps, warm)
            parts_sum: dict[str, float] = {}
            for micro in range(accumulate):
                rows = batch_rows(step, micro, data.shape[0], batch_size, accumulate, seed)
                rows = rows[rank * batch_size // world : (rank + 1) * batch_size // world]
                ids = data[rows].to(device)
                t_logits = t_hidden = None
                if loss.needs_teacher:
                    if cache is not None:
                        t_logits = cache.logits(rows).to(device)
                    else:
                        with torch.inference_mode():
                            t_logits = model_logits(teacher, ids)
                        # inference tensors cannot be saved for backward: normal copies, outside the mode
                        t_logits = t_logits.clone()
                        t_hidden = [h.clone() for h in hidden_t.take()] if hidden_t else None
                amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
                with amp:
                    s_logits = model_logits(student, ids)
                    total, parts = loss(s_logits, t_logits, ids, hidden_s.take() if hidden_s else None, t_hidden)
                (total / accumulate).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / accumulate
                result.tokens += ids.numel()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], **parts_sum})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{parts_sum['total']:.4f}")
            done = step + 1
            if checkpoint is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == steps):
                if rank == 0:
                    save_training_state(student, checkpoint, optimizer, extra={
                        "step": done, "seed": seed, "history": result.history, "tokens": result.tokens,
                        "rng": torch.get_rng_state()})
        if bar is not None:
            bar.close()
    student.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _check_data(data: Any) -> torch.Tensor:
    if isinstance(data, (list, tuple)):
        data = torch.cat([d.reshape(1, -1) if d.dim() == 1 else d for d in data])
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point() or data.shape[1] < 2:
        raise SparsityError("data must be token ids [rows, tokens] (an integer tensor, at least 2 tokens per row), "
                            "e.g. sparsetorch.data.text.random_windows(...)", got=getattr(data, "shape", type(data)))
    return data.long()


def _open_cache(teacher_cache, data: torch.Tensor, loss: DistillLoss) -> TeacherCache | None:
    if teacher_cache is None or not loss.needs_teacher:
        return None
    cache = teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(teacher_cache)
    cache.check_data(data)
    return cache


def _progress(enabled: bool, steps: int, first: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=first, desc="distill", unit="step")
