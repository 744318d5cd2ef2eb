"""The format registry and the checks every decoder shares."""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.quant_grid import QuantGridState
from ..errors import SparsityError
from . import grid_codec

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
    if not isinstance(name, str) or name not in _DTYPES:  # a list/dict from a hostile header is unhashable
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


# value codecs: how kept values are stored. "fp32" means exact (whatever the tensor's dtype is);
# the others are lossy and used only when asked for, except the integer codes of a weight on its
# module's quantization grid (grid_codec), which are exact. save() also takes "grid" (SAVE_VALUES).
VALUE_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
SAVE_VALUES = VALUE_CODECS + ("grid",)
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ITEMSIZE = {"fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}


def lossy_applies(tensor: torch.Tensor, values: str) -> bool:
    """Lossy codecs touch only floating tensors wider than 16 bits; int8/int4 only matrices (>= 2-D), whose
    rows get their own scale (a bias or norm vector stays exact: it is tiny and sensitive)."""
    if values in ("fp32", "grid") or not tensor.is_floating_point() or tensor.element_size() <= 2 or not tensor.numel():
        return False
    return values not in grid_codec.INT_CODECS or tensor.dim() >= 2


def stored_itemsize(tensor: torch.Tensor, codec: str | None) -> float:
    """Bytes one stored value takes under ``codec`` (None: as it is)."""
    return _ITEMSIZE[codec] if codec in _ITEMSIZE else tensor.element_size()


def quantize(tensor: torch.Tensor, values: str) -> tuple[torch.Tensor, Parts]:
    """``tensor`` as stored by codec ``values``: (stored tensor, extra parts such as int8 row scales)."""
    if not torch.isfinite(tensor).all():
        raise SparsityError(f"values={values!r} cannot store inf/nan weights; save with values='fp32'")
    if values in _CAST:
        if values == "fp16" and tensor.numel() and float(tensor.abs().max()) > torch.finfo(torch.float16).max:
            raise SparsityError("weights exceed the fp16 range (65504); save with values='bf16' or 'fp32'")
        return tensor.to(_CAST[values]), {}
    # symmetric per-row int8/int4 (LLM.int8()/absmax quantization): scale = max|row| / qmax, error <= scale / 2
    return grid_codec.rows_quantize(tensor, values)[:2]


def prepare(tensor: torch.Tensor, values: str, grid: QuantGridState | None = None,
            key: str = "tensor") -> tuple[torch.Tensor, Parts, str | None, Meta]:
    """What the formats encode for codec ``values``: (stored tensor, extra parts, stored codec or None, extra meta).

    A tensor with a quantization ``grid`` is stored as its exact grid codes under "grid" (int8 or int4 by the
    grid's bits), "int8" (any grid) and "int4" (a 4-bit grid); under the other codecs the grid is ignored."""
    if grid is not None and values in ("int8", "int4", "grid") and tensor.numel():
        codec = values if values != "grid" else "int8" if grid.grid.bits == 8 else "int4"
        codes, extra, cmeta = grid_codec.grid_quantize(tensor, grid, codec, key)
        return codes, extra, codec, cmeta
    if lossy_applies(tensor, values):
        return (*quantize(tensor, values), values, {})
    return tensor, {}, None, {}


def encode(fmt: str, tensor: torch.Tensor, mask: torch.Tensor | None, values: str = "fp32",
           prepared: tuple | None = None) -> tuple[Parts, Meta]:
    """Encode ``tensor`` (and its mask) in format ``fmt`` with value codec ``values``: ``(parts, meta)``.
    ``prepared`` is ``prepare(tensor, values)`` when trying several formats (quantize once)."""
    meta: Meta = {"format": fmt, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    tensor, extra, codec, cmeta = prepared or prepare(tensor, values)
    if codec is not None:
        meta["values"] = codec
    parts, fmeta = FORMATS[fmt].encode(tensor, mask)
    if mask is None and fmt != "dense":
        fmeta["masked"] = False  # a sparse code of an unmasked tensor: decode gives no mask
    if codec == "int4":  # the format chose which codes to keep; now two to a byte
        fmeta["nibbles"] = int(parts["values"].numel())
        parts = {**parts, "values": grid_codec.pack_int4(parts["values"])}
    return {**parts, **extra}, {**meta, **cmeta, **fmeta}


# Lossless squeeze of any part: split it into byte planes (byte i of every element; the sign/exponent
# byte of trained weights takes a few distinct values) and Huffman-code each plane with zlib.
# Saves ~17% of fp32 values and ~33% of bf16; a part that does not shrink is kept as it is.
_MIN_SQUEEZE = 256


def squeeze(parts: Parts, meta: Meta) -> tuple[Parts, Meta]:
    """Return ``(parts, meta)`` with every part that gets smaller replaced by its byte-plane zlib code."""
    out, z = dict(parts), {}
    for key, part in parts.items():
        size = part.numel() * part.element_size()
        if size < _MIN_SQUEEZE:
            continue
        planes = part.contiguous().reshape(-1).view(torch.uint8).reshape(part.numel(), -1).T.numpy()  # [isz, n]
        codes = []
        for plane in planes:
            c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
            codes.append(c.compress(plane.tobytes()) + c.flush())
        if sum(map(len, codes)) < size:
            out[key] = torch.frombuffer(bytearray(b"".join(codes)), dtype=torch.uint8)
            z[key] = {"dtype": dtype_name(part.dtype), "numel": part.numel(), "planes": [len(c) for c in codes]}
    return out, ({**meta, "z": z} if z else meta)


def _unsqueeze(parts: Parts, meta: Meta) -> Parts:
    z = meta.get("z")
    if not isinstance(z, dict):
        raise SparsityError("file has a corrupted compressed-part table; it is corrupted")
    limit = 8 * math.prod(parse_shape(meta.get("shape"))) + 64  # no legit part holds more bytes than this
    out = dict(parts)
    for key, info in z.items():
        if not isinstance(info, dict):
            raise SparsityError("file has a corrupted compressed-part table; it is corrupted")
        dtype, numel, lengths = parse_dtype(info.get("dtype")), info.get("numel"), info.get("planes")
        isz = dtype.itemsize
        if (not isinstance(numel, int) or not 0 <= numel * isz <= limit or not isinstance(lengths, list)
                or len(lengths) != isz or not all(isinstance(n, int) and n >= 0 for n in lengths)):
            raise SparsityError(f"compressed part {key!r} has invalid sizes; the file is corrupted")
        blob = need(parts, key, sum(lengths), torch.uint8).numpy().tobytes()
        planes, start = [], 0
        for n in lengths:
            d = zlib.decompressobj()
            try:
                plane = d.decompress(blob[start:start + n], numel)  # never more than numel bytes
            except zlib.error:
                plane = b""
            if len(plane) != numel or not d.eof or d.unconsumed_tail or d.unused_data:
                raise SparsityError(f"compressed part {key!r} does not decode to {numel} bytes; the file is corrupted")
            planes.append(np.frombuffer(plane, dtype=np.uint8))
            start += n
        raw = np.ascontiguousarray(np.stack(planes, axis=1)) if planes else np.zeros((numel, isz), np.uint8)
        out[key] = torch.from_numpy(raw.reshape(-1)).view(dtype) if numel else torch.zeros(0, dtype=dtype)
    return out


def decode(parts: Parts, meta: Meta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dense tensor, mask or None)`` of one file entry (see ``decode_with_grid``)."""
    return decode_with_grid(parts, meta)[:2]


def decode_with_grid(parts: Parts, meta: Meta) -> tuple[torch.Tensor, torch.Tensor | None, QuantGridState | None]:
    """``(dense tensor, mask or None, quantization grid or None)`` of one file entry, everything validated."""
    name = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(name, str) or name not in FORMATS:  # a list/dict from a hostile header is unhashable
        raise SparsityError(
            f"file uses storage format {name!r}, unknown to this sparsetorch; upgrade sparsetorch to read it"
        )
    if "z" in meta:
        parts = _unsqueeze(parts, meta)
    codec = meta.get("values", "fp32")
    if not isinstance(codec, str) or codec not in VALUE_CODECS or codec == "fp32" and "values" in meta:
        raise SparsityError(f"file uses value codec {codec!r}, unknown to this sparsetorch; upgrade sparsetorch")
    grid = None
    if codec == "fp32":
        dense, mask = FORMATS[name].decode(parts, meta)
    else:
        dtype = parse_dtype(meta.get("dtype"))
        if not dtype.is_floating_point:
            raise SparsityError(f"value codec {codec!r} on a {dtype} tensor; the file is corrupted")
        if codec == "int4":
            numel = math.prod(parse_shape(meta.get("shape")))
            count = meta.get("nibbles")
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= numel:
                raise SparsityError(f"int4 tensor has an invalid 'nibbles' ({count!r}); the file is corrupted")
            parts = {**parts, "values": grid_codec.unpack_int4(need(parts, "values"), count)}
        stored = _CAST.get(codec, torch.int8)
        dense, mask = FORMATS[name].decode(parts, {**meta, "dtype": dtype_name(stored)})
        if codec in _CAST:
            dense = dense.to(dtype)
        else:
            dense, grid = grid_codec.dequantize(dense, parts, meta, dtype)
    if meta.get("masked", True) is False:
        mask = None
    return dense, mask, grid


def stored_bytes(parts: Parts) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())
