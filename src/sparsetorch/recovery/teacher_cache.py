"""Teacher logits on disk, so distillation need not keep the teacher in memory (or run it every step).

``TeacherCache.build(teacher, data, folder)`` runs the teacher once over every row of ``data`` ([N, T] token
ids) and writes its logits in chunks of rows (safetensors, one file per chunk, each written atomically),
then ``cache.json`` last: a folder without it is an unfinished build and is refused. ``cache.json`` records
the shapes, the dtype and a SHA-256 of the data, so a cache is never used with other data.
Rows are read back through memory maps, one row at a time: the cache's size does not count against memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import SparsityError
from ..formats.atomic import atomic_write

__all__ = ["TeacherCache", "data_fingerprint", "model_logits"]

MANIFEST = "cache.json"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def data_fingerprint(data: torch.Tensor) -> str:
    """SHA-256 of the token ids (as int64) and their shape."""
    ids = data.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()


def model_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)``'s logits [B, T, V], whether the model returns a tensor or a transformers output."""
    out = model(ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise SparsityError("the model's output has no [batch, tokens, vocab] logits; distillation needs a causal "
                            f"LM (a tensor or an output with .logits), got {type(out).__name__}")
    return logits


class TeacherCache:
    """Read access to a finished cache folder: ``cache.logits(rows)`` -> [len(rows), T, V]."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise SparsityError(f"{self.folder} holds no finished teacher cache (no {MANIFEST}); a build was "
                                "interrupted or this is the wrong folder. Build it with TeacherCache.build",
                                folder=str(self.folder))
        try:
            info = json.loads(manifest.read_text())
            self.rows, self.length, self.vocab = (int(info[k]) for k in ("rows", "length", "vocab"))
            self.chunk, self.fingerprint, self.files = int(info["chunk"]), str(info["fingerprint"]), list(info["files"])
            self.dtype = _DTYPES[info["dtype"]]
            version = int(info["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SparsityError(f"{manifest} is corrupted ({exc!r}); rebuild the cache", folder=str(self.folder)) from None
        if version > VERSION:
            raise SparsityError(f"{manifest} is version {version}; this sparsetorch reads up to {VERSION}")
        if self.chunk < 1 or len(self.files) != -(-self.rows // self.chunk):
            raise SparsityError(f"{manifest} lists {len(self.files)} files for {self.rows} rows in chunks of "
                                f"{self.chunk}; it is corrupted, rebuild the cache")
        for name in self.files:
            if Path(name).name != name or not (self.folder / name).is_file():
                raise SparsityError(f"teacher cache file {name!r} is missing from {self.folder}; rebuild the cache")

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: torch.nn.Module, data: torch.Tensor, folder: str | os.PathLike, *, batch_size: int = 8,
              chunk: int = 64, dtype: torch.dtype = torch.float32) -> "TeacherCache":
        """Run ``teacher`` (under inference mode, in eval mode) over ``data`` [N, T] and write its logits."""
        name = {v: k for k, v in _DTYPES.items()}.get(dtype)
        if name is None:
            raise SparsityError(f"cache dtype must be one of {sorted(_DTYPES)}", got=str(dtype))
        if data.dim() != 2 or data.shape[0] == 0:
            raise SparsityError("teacher cache data must be [rows, tokens] token ids with at least one row",
                                got=tuple(data.shape))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # an overwritten cache is unfinished until its manifest is back
        was_training = teacher.training
        teacher.eval()
        files, vocab = [], None
        try:
            with torch.inference_mode():
                for start in range(0, data.shape[0], chunk):
                    rows = data[start : start + chunk]
                    logits = torch.cat([model_logits(teacher, b) for b in rows.split(batch_size)]).to(dtype)
                    vocab = logits.shape[-1]
                    files.append(f"logits-{start // chunk:05d}.safetensors")
                    atomic_write(folder / files[-1], safetensors_bytes({"logits": logits.contiguous()}))
        finally:
            teacher.train(was_training)
        info = {"version": VERSION, "rows": data.shape[0], "length": data.shape[1], "vocab": vocab, "chunk": chunk,
                "dtype": name, "fingerprint": data_fingerprint(data), "files": files}
        atomic_write(folder / MANIFEST, json.dumps(info, indent=1).encode())
        return cls(folder)

    def check_data(self, data: torch.Tensor) -> None:
        """The cache must have been built from exactly ``data``."""
        if tuple(data.shape) != (self.rows, self.length) or data_fingerprint(data) != self.fingerprint:
            raise SparsityError(f"the teacher cache in {self.folder} was built from other data (shape "
                                f"{[self.rows, self.length]}); rebuild it for these {list(data.shape)} token ids",
                                folder=str(self.folder))

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The cached logits of ``rows`` (row indices into the data), [len(rows), T, V], as ``self.dtype``."""
        out = []
        for r in rows.tolist():
            if not 0 <= r < self.rows:
                raise SparsityError(f"row {r} is outside the cache's {self.rows} rows")
            path = self.folder / self.files[r // self.chunk]
            try:
                with safe_open(str(path), framework="pt") as fh:
                    piece = fh.get_slice("logits")
                    shape = piece.get_shape()
                    expect_rows = min(self.chunk, self.rows - (r // self.chunk) * self.chunk)
                    if list(shape) != [expect_rows, self.length, self.vocab]:
                        raise SparsityError(f"{path} holds logits of shape {shape}, expected "
                                            f"{[expect_rows, self.length, self.vocab]}; rebuild the cache")
                    row = piece[r % self.chunk : r % self.chunk + 1]
            except SparsityError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
                raise SparsityError(f"{path} is not a readable teacher cache file ({exc}); rebuild the cache",
                                    path=str(path)) from None
            if row.dtype != self.dtype:
                raise SparsityError(f"{path} holds {row.dtype} logits, the manifest says {self.dtype}; rebuild the cache")
            out.append(row)
        return torch.cat(out)
