"""The calibration activations between blocks of an out-of-core run, one tensor per sample.

The outputs of each finished block are written to disk (one safetensors file per sample, atomically),
which is what lets a killed run resume at the next block with bitwise the same inputs. They are also
kept in memory unless ``spill`` is set; ``dtype`` (float16/bfloat16) halves what is held and written,
at the price of rounding the inputs every block sees (the masks then differ from a float32 run's).
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import SparsityError
from ..formats.atomic import atomic_write
from ..formats.safetensors_file import read_safetensors_file

HALF_DTYPES = (torch.float16, torch.bfloat16)


class ActivationStore:
    """Hidden states entering block ``k`` (generation ``k``), held in memory and/or on disk under ``root``."""

    def __init__(self, root: Path, samples: int, *, spill: bool, dtype: torch.dtype | None) -> None:
        if dtype is not None and dtype not in (*HALF_DTYPES, torch.float32):
            raise SparsityError(f"activation_dtype must be torch.float16, torch.bfloat16, torch.float32 or None (the "
                                f"model's dtype), got {dtype!r}", activation_dtype=str(dtype))
        self.root, self.samples, self.spill, self.dtype = root, samples, spill, dtype
        self.memory: dict[int, list[torch.Tensor | None]] = {}

    def _path(self, generation: int, i: int) -> Path:
        return self.root / f"{generation:05d}" / f"{i:06d}.safetensors"

    def stored(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` as it is kept: on the CPU, in the store's dtype (the model's if None)."""
        return value.detach().to("cpu", self.dtype or value.dtype).contiguous()

    def put(self, generation: int, i: int, value: torch.Tensor, *, write: bool = True) -> None:
        """Keep ``value`` as sample ``i`` of ``generation``; ``write=False`` keeps it in memory only (not for
        resuming), unless the store spills."""
        value = self.stored(value)
        if write or self.spill:
            atomic_write(self._path(generation, i), safetensors_bytes({"hidden": value}))
        if not self.spill:
            self.memory.setdefault(generation, [None] * self.samples)[i] = value

    def put_all(self, generation: int, values: Iterable[torch.Tensor], *, write: bool = True) -> None:
        count = 0
        for i, value in enumerate(values):
            self.put(generation, i, value, write=write)
            count += 1
        if count != self.samples:
            raise SparsityError(f"expected {self.samples} activations for block {generation}, got {count}")

    def has(self, generation: int) -> bool:
        return all(self._path(generation, i).is_file() for i in range(self.samples))

    def inputs(self, generation: int, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The activations of ``generation``, one sample at a time, on ``device`` in the model's ``dtype``."""
        held = self.memory.get(generation)
        for i in range(self.samples):
            if held is not None and held[i] is not None:
                value = held[i]
            else:
                _, tensors = read_safetensors_file(self._path(generation, i), written_by="an out-of-core run")
                if "hidden" not in tensors:
                    raise SparsityError(f"{self._path(generation, i)} holds no activations; delete the output "
                                        "folder's .sparsetorch-run to start over")
                value = tensors["hidden"]
            yield value.to(device, dtype)

    def drop(self, generation: int) -> None:
        self.memory.pop(generation, None)
        shutil.rmtree(self.root / f"{generation:05d}", ignore_errors=True)

    def clear(self) -> None:
        self.memory.clear()
        shutil.rmtree(self.root, ignore_errors=True)
