"""A byte-level text corpus from the Python standard library's own ``.py`` sources (always on the
machine, nothing downloaded), with a deterministic train/validation split by file."""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SparsityError


@dataclass(frozen=True)
class TextSplit:
    """Train and validation bytes as uint8 tensors, and the files each came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: int
    val_files: int


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted order (tests and site-packages excluded)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def load_stdlib_text(max_bytes: int = 8_000_000, val_every: int = 10, root: str | Path | None = None) -> TextSplit:
    """Bytes of the sorted stdlib sources up to ``max_bytes``; every ``val_every``-th file is validation."""
    files = stdlib_files(root)
    if not files:
        raise SparsityError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % val_every == val_every - 1 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return TextSplit(as_tensor(train), as_tensor(val), len(train), len(val))


def random_windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes: ``[count, length]`` int64."""
    if data.numel() < length:
        raise SparsityError(f"text has {data.numel()} bytes, fewer than a window of {length}")
    starts = torch.randint(0, data.numel() - length + 1, (count,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()
