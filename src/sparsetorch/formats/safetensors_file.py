"""The one reader (and writer) of the library's safetensors files: tensors plus one JSON header in the metadata.

``sparsetorch.save`` files, shrunk models and training states differ only in the metadata key that holds
their header and in its version; reading them goes through :func:`read_safetensors`, which turns every
way a file can be damaged into a ``SparsityError`` before anything is decoded.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import SparsityError
from .atomic import atomic_write

__all__ = ["read_safetensors", "read_safetensors_file", "write_safetensors", "shard_files", "ShardedCheckpoint",
           "INDEX_FILE"]

INDEX_FILE = "model.safetensors.index.json"  # Hugging Face: tensor name -> shard file


def read_safetensors_file(path: str | os.PathLike, *, written_by: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of any safetensors file (another library's too); a missing, truncated or
    corrupted file raises ``SparsityError``. ``written_by`` names the writer for the error messages."""
    path = Path(path)
    if not path.is_file():
        raise SparsityError(f"no such file: {path}; pass a file written by {written_by}", path=str(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad headers and data
        raise SparsityError(f"{path} is not a readable safetensors file ({exc}); it is corrupted or truncated",
                            path=str(path)) from None
    return metadata, tensors


def read_safetensors(path: str | os.PathLike, meta_key: str, *, newest_version: int,
                     written_by: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of the file at ``path`` whose metadata holds a JSON header under ``meta_key``
    with an int ``version`` <= ``newest_version``; ``written_by`` names the writer for the error messages."""
    path = Path(path)
    metadata, tensors = read_safetensors_file(path, written_by=written_by)
    if meta_key not in metadata:
        raise SparsityError(f"{path} is a safetensors file but was not written by {written_by}")
    try:
        header = json.loads(metadata[meta_key])
    except json.JSONDecodeError:
        raise SparsityError(f"{path} has a corrupted header (not JSON); the file is damaged") from None
    version = header.get("version") if isinstance(header, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise SparsityError(f"{path} has a corrupted header (no integer version); the file is damaged")
    if version > newest_version:
        raise SparsityError(f"{path} was written in version {version} of its format; this sparsetorch reads up to "
                            f"{newest_version}. Upgrade sparsetorch to load it")
    return header, tensors


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta_key: str,
                      header: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``header`` as JSON under ``meta_key``, atomically (see ``atomic_write``)."""
    return atomic_write(Path(path), safetensors_bytes(tensors, metadata={meta_key: json.dumps(header)}))


def shard_files(directory: Path, single: str | None = None) -> tuple[list[Path], dict[str, str] | None]:
    """The shards of a Hugging Face checkpoint folder and, with ``model.safetensors.index.json``, its weight map
    (tensor name -> shard file name). Without an index: the file ``single`` if given, else every
    ``*.safetensors``. A damaged index or a missing shard raises ``SparsityError``."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SparsityError(f"{index_path} is not valid JSON ({exc}); the file is damaged",
                                path=str(index_path)) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise SparsityError(f"{index_path} has no weight_map of tensor names to shard files; the file is damaged",
                                path=str(index_path))
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or name in ("", ".", ".."):
                raise SparsityError(f"{index_path} names a shard {name!r} outside the folder; the index is damaged "
                                    "or hostile", shard=name)
            if not (directory / name).is_file():
                raise SparsityError(f"{index_path} lists the shard {name!r}, which is missing from {directory}; copy "
                                    "the whole checkpoint folder", shard=name)
        return [directory / n for n in names], weight_map
    if single is not None:
        if not (directory / single).is_file():
            raise SparsityError(f"{directory} holds neither {INDEX_FILE} nor {single}; pass a folder written by "
                                "save_pretrained", path=str(directory))
        return [directory / single], None
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        raise SparsityError(f"{directory} holds no *.safetensors files", path=str(directory))
    return files, None


class ShardedCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint folder, listed from the shards' headers up front
    (names, shapes, dtypes; nothing decoded) and read by name on demand, so a model larger than memory can
    be read one block at a time. Every listing problem (a damaged index or shard, a tensor stored twice or in
    another shard than the index says, a tensor the index lists but no shard holds) is a ``SparsityError``
    raised by the constructor; a read that fails later (a shard changed or truncated meanwhile) is one too."""

    def __init__(self, directory: str | os.PathLike, *, written_by: str = "save_pretrained") -> None:
        self.directory = Path(directory)
        self.written_by = written_by
        files, weight_map = shard_files(self.directory, single="model.safetensors")
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.where: dict[str, Path] = {}
        for path in files:
            for key, shape, dtype in self._header(path):
                if key in self.where:
                    raise SparsityError(f"tensor {key!r} is stored twice (again in {path.name}); the checkpoint is "
                                        "damaged", key=key)
                if weight_map is not None and weight_map.get(key) != path.name:
                    raise SparsityError(f"{path.name} holds {key!r}, which {INDEX_FILE} places in "
                                        f"{weight_map.get(key)!r}; the checkpoint is damaged", key=key,
                                        shard=path.name)
                self.where[key], self.shapes[key], self.dtypes[key] = path, shape, dtype
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.where))
            if lost:
                raise SparsityError(f"{INDEX_FILE} lists {len(lost)} tensors its shards do not hold (e.g. "
                                    f"{lost[0]!r} in {weight_map[lost[0]]!r}); a shard is truncated or from another "
                                    "checkpoint", missing=lost[:10])

    def _header(self, path: Path) -> list[tuple[str, tuple[int, ...], str]]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return [(k, tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()]
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad headers
            raise SparsityError(f"{path} is not a readable safetensors file ({exc}); it is corrupted or truncated",
                                path=str(path)) from None

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys``, each read with plain file reads straight into its own memory (no
        memory map: mapped pages would count against the process as a second copy while the shard is open)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.where:
                raise SparsityError(f"{self.directory} holds no tensor {key!r}", key=key)
            by_file.setdefault(self.where[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            try:
                with open(path, "rb") as fh:
                    spans = _data_spans(fh, path.stat().st_size)
                    for key in names:
                        out[key] = _read_tensor(fh, key, spans[key])
            except SparsityError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise SparsityError(f"{path} could not be read ({exc}); it changed or was truncated since the run "
                                    "began", path=str(path)) from None
        return out

    def digest(self) -> str:
        """A fingerprint of the checkpoint's layout: shard names and sizes, tensor names, shapes and dtypes
        (not the values: hashing a model larger than memory would read all of it)."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(f"{path.name}:{path.stat().st_size};".encode())
        for key in sorted(self.where):
            h.update(f"{key}:{self.where[key].name}:{self.shapes[key]}:{self.dtypes[key]};".encode())
        return h.hexdigest()


_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}


def _data_spans(fh, file_size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """A safetensors header (8-byte little-endian length, then JSON): name -> (dtype, shape, start, end) with
    absolute byte offsets, each checked against the file's size."""
    length = int.from_bytes(fh.read(8), "little")
    if not 0 < length <= file_size - 8:
        raise SparsityError(f"{fh.name} has a corrupted safetensors header length {length}", path=str(fh.name))
    header = json.loads(fh.read(length))
    base, spans = 8 + length, {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        spans[key] = (meta["dtype"], tuple(int(d) for d in meta["shape"]), base + int(start), base + int(end))
        if not base <= spans[key][2] <= spans[key][3] <= file_size:
            raise SparsityError(f"{fh.name}: tensor {key!r} lies outside the file; it is truncated", key=key)
    return spans


def _read_tensor(fh, key: str, span: tuple[str, tuple[int, ...], int, int]) -> torch.Tensor:
    code, shape, start, end = span
    dtype = _STORED_DTYPES.get(code)
    numel = 1
    for d in shape:
        numel *= d
    if dtype is None or (end - start) != numel * dtype.itemsize:
        raise SparsityError(f"{fh.name}: tensor {key!r} ({code} {list(shape)}) does not match its {end - start} "
                            "stored bytes; the file is damaged", key=key)
    raw = torch.empty(end - start, dtype=torch.uint8)
    fh.seek(start)
    if fh.readinto(memoryview(raw.numpy())) != end - start:
        raise SparsityError(f"{fh.name}: tensor {key!r} is cut short; the file is truncated", key=key)
    return raw.view(dtype).reshape(shape)  # safetensors stores little-endian, as torch does on every supported CPU
