"""The one reader (and writer) of the library's safetensors files: tensors plus one JSON header in the metadata.

``sparsetorch.save`` files, shrunk models and training states differ only in the metadata key that holds
their header and in its version; reading them goes through :func:`read_safetensors`, which turns every
way a file can be damaged into a ``SparsityError`` before anything is decoded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import SparsityError
from .atomic import atomic_write

__all__ = ["read_safetensors", "read_safetensors_file", "write_safetensors"]


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
