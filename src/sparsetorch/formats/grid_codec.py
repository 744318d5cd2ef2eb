"""Integer value codecs: int8 or int4 codes (int4 packed two per byte) times per-row or per-group scales.

* Lossy, ``values="int8"/"int4"`` on a floating matrix without a grid: symmetric per row,
  ``scale = max|row| / qmax`` (qmax 127 / 7), error <= scale / 2.
* Exact, a weight whose module remembers a quantization grid (``core.quant_grid``): the grid's own
  codes and scales, which read back bit for bit (``values="grid"``, or "int8"/"int4" when they fit).

The codes replace the weights inside any storage format (a sparse format stores only the kept codes).
A file entry adds to its meta ``"values": "int8" | "int4"``, optionally ``"group_size"`` (columns per
scale; absent: one scale per row), and for a grid ``"grid": true``, ``"grid_bits"`` (4 or 8: a 4-bit grid
may be stored as int8) and ``"transposed": true`` (a grid of ``W^T``, GPT-2's ``Conv1D``); int4 adds
``"nibbles"``, the number of codes. Parts: ``scales`` float32 ``[rows * n_groups]``; int4 ``values`` are
uint8, two codes a byte (low nibble first, two's complement, -8 never used). Every field read from a
file is validated here before a weight is built.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..core.quant_grid import QMAX, QuantGrid, QuantGridState, expand_scales, grid_codes, grid_matrix
from ..errors import SparsityError

__all__ = ["INT_CODECS", "rows_quantize", "grid_quantize", "pack_int4", "unpack_int4", "dequantize"]

INT_CODECS = {"int8": 8, "int4": 4}
_BAD = "the file is corrupted"


def rows_quantize(tensor: torch.Tensor, codec: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Lossy symmetric per-row codes of a matrix (LLM.int8()/absmax): ``(codes int8, {"scales": [rows]}, {})``."""
    qmax = QMAX[INT_CODECS[codec]]
    rows = tensor.detach().reshape(tensor.shape[0], -1).float()  # [out, in * k...]
    scale = rows.abs().amax(dim=1) / qmax  # [out]
    q = torch.where(scale[:, None] > 0, rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                    torch.zeros_like(rows))
    return q.round().clamp(-qmax, qmax).to(torch.int8).reshape(tensor.shape), {"scales": scale}, {}


def grid_quantize(tensor: torch.Tensor, state: QuantGridState, codec: str,
                  key: str = "weight") -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """The exact codes of a weight on its module's grid: ``(codes int8 like tensor, {"scales"}, meta)``; raises
    SparsityError when the grid does not fit ``codec`` or the weights have left the grid."""
    grid = state.grid
    if grid.bits > INT_CODECS[codec]:
        raise SparsityError(f"{key} lies on an {grid.bits}-bit grid, which {codec} codes cannot hold; save with "
                            "values='grid' or values='int8'", key=key)
    matrix = grid_matrix(tensor.detach(), state.transposed)
    scales = state.scales.detach().cpu().float()
    if tuple(scales.shape) != (matrix.shape[0], grid.n_groups(matrix.shape[1])):
        raise SparsityError(f"the grid scales of {key} have shape {tuple(scales.shape)}, which does not fit the "
                            f"weight {tuple(tensor.shape)}; set the grid again (set_quant_grid)", key=key)
    codes, off = grid_codes(matrix, scales, grid)
    if off:
        raise SparsityError(f"{off} weights of {key} have left its quantization grid (changed after it was set, "
                            "e.g. by training); quantize them again, drop the grid with remove_quant_grid, or save "
                            "with values='fp32'", key=key, off_grid=off)
    codes = codes.t() if state.transposed else codes.reshape(tensor.shape)
    meta: dict[str, Any] = {"grid": True, "grid_bits": grid.bits}
    if grid.group_size is not None:
        meta["group_size"] = grid.group_size
    if state.transposed:
        meta["transposed"] = True
    return codes.contiguous(), {"scales": scales.reshape(-1).contiguous()}, meta


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] -> uint8 ``[ceil(n / 2)]``, two a byte, the first in the low nibble."""
    flat = codes.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``count`` int8 codes, each checked to lie in [-7, 7] (padding nibble 0)."""
    if packed.dtype != torch.uint8:
        raise SparsityError(f"int4 values have dtype {packed.dtype}, expected uint8; {_BAD}")
    if packed.numel() != (count + 1) // 2:
        raise SparsityError(f"int4 values hold {packed.numel()} bytes for {count} codes (expected "
                            f"{(count + 1) // 2}); {_BAD}")
    b = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)  # [2 * bytes]
    if count % 2 and int(nib[-1]):
        raise SparsityError(f"int4 values have bits set past their {count} codes; {_BAD}")
    nib = nib[:count]
    if bool((nib == 8).any()):
        raise SparsityError(f"int4 values hold the code -8, outside the symmetric range [-7, 7]; {_BAD}")
    return torch.where(nib > 7, nib - 16, nib).to(torch.int8)


def _flag(meta: dict, key: str) -> bool:
    value = meta.get(key, False)
    if not isinstance(value, bool):
        raise SparsityError(f"file has an invalid {key!r} ({value!r}) for an integer codec; {_BAD}")
    return value


def _small_int(meta: dict, key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SparsityError(f"file has an invalid {key!r} ({value!r}) for an integer codec; {_BAD}")
    return value


def dequantize(codes: torch.Tensor, parts: dict[str, torch.Tensor], meta: dict,
               dtype: torch.dtype) -> tuple[torch.Tensor, QuantGridState | None]:
    """Weights from the decoded int8 ``codes`` (the tensor's shape) and the entry's scales: ``(weights, grid or
    None)``; validates the meta fields, the scales (float32, the right count, finite, >= 0) and the code range."""
    codec = meta["values"]
    is_grid, transposed = _flag(meta, "grid"), _flag(meta, "transposed")
    bits = _small_int(meta, "grid_bits", 4, INT_CODECS[codec]) if is_grid else INT_CODECS[codec]
    if bits not in QMAX or transposed and not is_grid:
        raise SparsityError(f"file has an invalid integer codec entry (bits {bits}, transposed {transposed}); {_BAD}")
    if transposed and codes.dim() != 2:
        raise SparsityError(f"a transposed grid on a {codes.dim()}-D tensor; {_BAD}")
    qmax = QMAX[bits]
    if codes.numel() and int(codes.to(torch.int16).abs().max()) > qmax:
        raise SparsityError(f"{codec} codes lie outside [-{qmax}, {qmax}]; {_BAD}")
    matrix = codes.t() if transposed else codes.reshape(codes.shape[0] if codes.dim() else 1, -1)
    rows, cols = matrix.shape
    group = _small_int(meta, "group_size", 1, max(cols, 1)) if "group_size" in meta else None
    grid = QuantGrid(bits, group)
    width, groups = (group or max(cols, 1)), (math.ceil(cols / group) if group else 1)
    scales = parts.get("scales")
    if scales is None:
        raise SparsityError(f"file lacks the scales of an {codec} tensor; it is corrupted or truncated")
    if scales.dtype != torch.float32 or scales.numel() != rows * groups:
        raise SparsityError(f"{codec} scales have dtype {scales.dtype} and {scales.numel()} elements, expected "
                            f"float32 and {rows * groups} ({rows} rows x {groups} groups); {_BAD}")
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise SparsityError(f"{codec} scales are negative or not finite; {_BAD}")
    scales = scales.reshape(rows, groups)
    values = (matrix.float() * expand_scales(scales, width, cols)).to(dtype)
    values = values.t() if transposed else values.reshape(codes.shape)
    return values.contiguous(), (QuantGridState(scales.clone(), grid, transposed) if is_grid else None)
