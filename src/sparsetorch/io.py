"""``sparsetorch.save`` / ``sparsetorch.load``: weights and masks in one safetensors file.

No pickle anywhere: a file holds only tensors and a JSON header. Writes are atomic (a temp
file in the same folder, fsynced, then renamed), so a crash mid-write leaves the old file.
Loading validates the whole file against the model before changing anything.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save

from . import formats
from .errors import SparsityError
from .masks import iter_masks, remove_mask, set_mask

__all__ = ["save", "load", "read_header", "FILE_VERSION"]

FILE_VERSION = 1
_META_KEY = "sparsetorch"
_SEP = "::"


def save(model: torch.nn.Module, path: str | os.PathLike, *, format: str | None = None,
         metadata: dict | None = None) -> Path:
    """Write ``model``'s state_dict and masks to ``path`` (safetensors); returns the path.

    Masked tensors are stored compressed (``format`` picks one for all, default the
    smallest lossless), the rest as they are. ``metadata`` (JSON-able: e.g. the architecture
    and a sparsifier's history) is stored in the header; ``read_header(path)[0]["user"]`` returns it.
    """
    masks = {item.qualified_name: item.mask for item in iter_masks(model)}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    storages: set[int] = set()  # tied weights (lm_head = embedding) share storage; safetensors needs copies
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        mask = masks.get(key)
        fmt = format or choose_format(value, mask)
        parts, meta = formats.encode(fmt, value.detach().cpu(), None if mask is None else mask.cpu())
        entries[key] = meta
        for suffix, part in parts.items():
            part = part.contiguous()
            if part.numel() and part.untyped_storage().data_ptr() in storages:
                part = part.clone()
            storages.add(part.untyped_storage().data_ptr())
            tensors[f"{key}{_SEP}{suffix}"] = part
    header = {"version": FILE_VERSION, "tensors": entries, "user": metadata or {}}
    payload = _st_save(tensors, metadata={_META_KEY: json.dumps(header)})
    return atomic_write(Path(path), payload)


def choose_format(value: torch.Tensor, mask: torch.Tensor | None) -> str:
    """Smallest lossless format for ``value``: dense for unmasked tensors, else bitmask."""
    return "dense" if mask is None else "bitmask"


def atomic_write(path: Path, payload: bytes) -> Path:
    """Write bytes to ``path`` so readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse a sparsetorch file: ``(header, raw_parts)``, or raise ``SparsityError``."""
    path = Path(path)
    if not path.is_file():
        raise SparsityError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            raw = {key: fh.get_tensor(key) for key in fh.keys()}
    except SparsityError:
        raise
    except Exception as exc:  # safetensors raises several types for bad headers/data
        raise SparsityError(f"{path} is not a readable safetensors file ({exc}); it is corrupted or truncated") from None
    if _META_KEY not in metadata:
        raise SparsityError(f"{path} is a safetensors file but not one written by sparsetorch.save")
    try:
        header = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError:
        raise SparsityError(f"{path} has a corrupted sparsetorch header") from None
    version = header.get("version") if isinstance(header, dict) else None
    if not isinstance(version, int) or not isinstance(header.get("tensors"), dict):
        raise SparsityError(f"{path} has a corrupted sparsetorch header")
    if version > FILE_VERSION:
        raise SparsityError(
            f"{path} was written in file format version {version}; this sparsetorch reads up to "
            f"{FILE_VERSION}. Upgrade sparsetorch to load it"
        )
    return header, raw


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode every tensor of a sparsetorch file: ``(state_dict, masks)``."""
    header, raw = read_header(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        key, sep, suffix = name.rpartition(_SEP)
        if not sep or key not in header["tensors"]:
            raise SparsityError(f"{path} holds an unexpected tensor {name!r}; it is corrupted")
        grouped.setdefault(key, {})[suffix] = tensor
    state, masks = {}, {}
    for key, meta in header["tensors"].items():
        value, mask = formats.decode(grouped.get(key, {}), meta)
        state[key] = value
        if mask is not None:
            masks[key] = mask
    return state, masks


def load(path: str | os.PathLike, model: torch.nn.Module, *, strict: bool = True) -> torch.nn.Module:
    """Load weights and masks from ``path`` into ``model`` (in place) and return it.

    The file is decoded and checked against the model first (names, shapes, dtypes); on any
    mismatch ``SparsityError`` says what differs and the model is left untouched.
    """
    state, masks = read_tensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise SparsityError(
            f"{path} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the same architecture "
            "before loading",
            missing=missing, unexpected=unexpected,
        )
    for key, value in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise SparsityError(
                f"{key} has shape {tuple(value.shape)} in {path} but {tuple(expected[key].shape)} in the model",
                key=key,
            )
    modules = dict(model.named_modules())
    owners = {}
    for key in masks:
        fqn, _, pname = key.rpartition(".")
        if fqn not in modules or not isinstance(getattr(modules[fqn], pname, None), torch.nn.Parameter):
            raise SparsityError(f"{path} has a mask for {key}, which is not a parameter of the model")
        owners[key] = (modules[fqn], pname)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
    for item in list(iter_masks(model)):
        if item.qualified_name not in masks:
            remove_mask(item.module, item.name)  # the file says this weight is dense now
    for key, mask in masks.items():
        module, pname = owners[key]
        set_mask(module, mask, pname)
    return model
