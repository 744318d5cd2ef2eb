"""The format registry and the checks every decoder shares."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SparsityError

Parts = dict[str, torch.Tensor]
Meta = dict[str, Any]


@dataclass(frozen=True)
class Format:
    name: str
    encode: Callable[[torch.Tensor, torch.Tensor | None], tuple[Parts, Meta]]
    decode: Callable[[Parts, Meta], tuple[torch.Tensor, torch.Tensor | None]]
    needs_mask: bool = True


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                      torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                      torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object) -> torch.dtype:
    if name not in _DTYPES:
        raise SparsityError(f"file names an unknown dtype {name!r}; it is corrupted or from a newer sparsetorch")
    return _DTYPES[name]


def parse_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 2**40 for s in shape):
        raise SparsityError(f"file has an invalid tensor shape {shape!r}; it is corrupted")
    if math.prod(shape) > 2**40:
        raise SparsityError(f"file claims a tensor of shape {shape} that is too large; it is corrupted")
    return tuple(shape)


def need(parts: Parts, key: str, numel: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fetch ``parts[key]`` and check its size and dtype, or raise a corruption error."""
    if key not in parts:
        raise SparsityError(f"file lacks the part {key!r} of a sparse tensor; it is corrupted or truncated")
    t = parts[key]
    if numel is not None and t.numel() != numel:
        raise SparsityError(f"part {key!r} has {t.numel()} elements, expected {numel}; the file is corrupted")
    if dtype is not None and t.dtype != dtype:
        raise SparsityError(f"part {key!r} has dtype {t.dtype}, expected {dtype}; the file is corrupted")
    return t


def encode(fmt: str, tensor: torch.Tensor, mask: torch.Tensor | None) -> tuple[Parts, Meta]:
    parts, meta = FORMATS[fmt].encode(tensor, mask)
    meta = {"format": fmt, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), **meta}
    return parts, meta


def decode(parts: Parts, meta: Meta) -> tuple[torch.Tensor, torch.Tensor | None]:
    name = meta.get("format") if isinstance(meta, dict) else None
    if name not in FORMATS:
        raise SparsityError(
            f"file uses storage format {name!r}, unknown to this sparsetorch; upgrade sparsetorch to read it"
        )
    return FORMATS[name].decode(parts, meta)
