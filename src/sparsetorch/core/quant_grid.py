"""Quantization grids: the spec (bits, group size), the integer codes of weights on a grid, and the grid on a module.

A grid is symmetric per output row and group of ``group_size`` consecutive inputs of the ``[out, in]``
matrix (``group_size=None``: one group per row): a weight on the grid is ``q * scale`` (float32 product)
with an integer ``q`` in ``[-qmax, qmax]``; 0 is on every grid, so pruned weights are. A module remembers
the grid of ``module.<name>`` like a mask (read ``masks.set_mask``): non-persistent buffers, so
``model.state_dict()`` stays the plain dense one,

* ``<name>_qscales`` float32 ``[out, n_groups]``, and
* ``<name>_qgrid`` int64 ``[3]``: bits, group size (0 = one group per row), 1 if the parameter is stored
  transposed ``[in, out]`` (GPT-2's ``Conv1D``).

``sparsetorch.save(model, path, values="grid")`` stores the integer codes and the scales, and
``sparsetorch.load`` restores the weights bit for bit and the grid with them.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import SparsityError
from .layer_selection import Target

__all__ = ["QuantGrid", "QuantGridState", "QuantGridParam", "QMAX", "expand_scales", "grid_codes", "grid_matrix",
           "set_quant_grid", "get_quant_grid", "has_quant_grid", "remove_quant_grid", "iter_quant_grids"]

QMAX = {8: 127, 4: 7}  # symmetric: -qmax..qmax, so 0 is on the grid and int4 never uses -8
SCALES_SUFFIX, SPEC_SUFFIX = "_qscales", "_qgrid"


@dataclass(frozen=True)
class QuantGrid:
    """A symmetric integer grid: ``bits`` 8 (q in [-127, 127]) or 4 (q in [-7, 7]), one scale per output row
    and ``group_size`` consecutive input columns (None: one scale per row; the last group of a row may be
    narrower when ``group_size`` does not divide the inputs)."""

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in QMAX:
            raise SparsityError(f"bits must be 8 or 4, got {self.bits!r}; pass bits=8 (int8) or bits=4 (int4)",
                                bits=self.bits)
        gs = self.group_size
        if gs is not None:
            try:
                gs = None if isinstance(gs, bool) else operator.index(gs)
            except TypeError:
                gs = None
            if gs is None or gs <= 0:
                raise SparsityError(f"group_size must be a positive integer (input columns sharing one scale, e.g. "
                                    f"128) or None (one scale per output row), got {self.group_size!r}",
                                    group_size=self.group_size)
            object.__setattr__(self, "group_size", gs)
        object.__setattr__(self, "bits", int(self.bits))

    @property
    def qmax(self) -> int:
        return QMAX[self.bits]

    def width(self, in_features: int) -> int:
        """Columns per group of a layer with ``in_features`` inputs (the last group may be narrower)."""
        if self.group_size is None:
            return max(int(in_features), 1)
        if self.group_size > in_features:
            raise SparsityError(f"group_size {self.group_size} is larger than the layer's {in_features} inputs; "
                                f"use a group_size <= {in_features} or group_size=None (one scale per row)",
                                group_size=self.group_size, in_features=in_features)
        return self.group_size

    def n_groups(self, in_features: int) -> int:
        """Groups per output row: ``ceil(in_features / width)``."""
        width = self.width(in_features)
        return -(-int(in_features) // width)


class QuantGridState(NamedTuple):
    """What a module remembers of its grid: scales ``[out, n_groups]`` of the ``[out, in]`` view, the grid,
    and whether the parameter is stored transposed ``[in, out]``."""

    scales: torch.Tensor
    grid: QuantGrid
    transposed: bool = False


@dataclass(frozen=True)
class QuantGridParam(Target):
    """One parameter with a grid: a ``Target`` plus its ``QuantGridState``."""

    state: QuantGridState | None = None


def expand_scales(scales: torch.Tensor, width: int, in_features: int) -> torch.Tensor:
    """Per-group scales ``[out, n_groups]`` as one scale per weight ``[out, in_features]``."""
    return scales.repeat_interleave(width, dim=1)[:, :in_features]


def grid_codes(matrix: torch.Tensor, scales: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, int]:
    """The integer codes of ``matrix [out, in]`` on the grid: ``(codes int8 [out, in], entries off the grid)``.

    An entry is on the grid when ``(q * scale)`` in float32, cast to ``matrix``'s dtype, equals it bit for
    bit with ``|q| <= qmax`` (a zero scale holds only 0). Off-grid entries get code 0.
    """
    cols = matrix.shape[1]
    full = expand_scales(scales.float(), grid.width(cols), cols)
    m = matrix.detach().float()
    q = torch.where(full > 0, m / full.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(m)).round()
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).clamp(-grid.qmax, grid.qmax)
    back = (q * full).to(matrix.dtype)
    exact = back == matrix.detach()  # -0.0 counts as on the grid (it reads back as 0.0, like the sparse formats)
    off = int((~exact).sum())
    return torch.where(exact, q, torch.zeros_like(q)).to(torch.int8), off


def grid_matrix(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view a grid describes: ``[out, in * k...]`` of the parameter, or its transpose."""
    if transposed:
        if param.dim() != 2:
            raise SparsityError(f"transposed=True needs a 2-D weight [in, out], got shape {tuple(param.shape)}")
        return param.t()
    if param.dim() < 2:
        raise SparsityError(f"a quantization grid needs a weight matrix (>= 2-D), got shape {tuple(param.shape)}")
    return param.reshape(param.shape[0], -1)


def set_quant_grid(module: nn.Module, scales: torch.Tensor, grid: QuantGrid, name: str = "weight", *,
                   transposed: bool = False) -> torch.Tensor:
    """Remember that ``module.<name>`` lies on ``grid`` with per-group ``scales [out, n_groups]`` (of the
    ``[out, in]`` view; ``transposed=True`` for a weight stored ``[in, out]``). The weights must already be on
    the grid (e.g. from ``sparsegpt_solve(..., grid=)`` or ``quantize_to_grid``): checked, else SparsityError.
    Returns the scales buffer."""
    param = getattr(module, name, None)
    if not isinstance(param, nn.Parameter):
        raise SparsityError(f"{type(module).__name__} has no parameter {name!r} to give a grid", parameter=name)
    if not isinstance(grid, QuantGrid):
        raise SparsityError(f"grid must be a QuantGrid(bits, group_size), got {type(grid).__name__}")
    matrix = grid_matrix(param, bool(transposed))
    rows, cols = matrix.shape
    want = (rows, grid.n_groups(cols))
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != want:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise SparsityError(f"scales of {name} must have shape {want} ([out, n_groups]), got {got}",
                            expected=want, got=got)
    scales = scales.detach().to(device=param.device, dtype=torch.float32)
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise SparsityError(f"scales of {name} must be finite and >= 0")
    _, off = grid_codes(matrix, scales, grid)
    if off:
        raise SparsityError(f"{off} weights of {name} are not on the grid; quantize them first "
                            "(sparsetorch.oneshot.quantize.quantize_to_grid) or pass the scales they were quantized "
                            "with", off_grid=off)
    spec = torch.tensor([grid.bits, grid.group_size or 0, int(bool(transposed))], dtype=torch.int64,
                        device=param.device)
    for suffix, value in ((SCALES_SUFFIX, scales), (SPEC_SUFFIX, spec)):
        module._buffers.pop(name + suffix, None)  # the shape may change: re-register
        module.register_buffer(name + suffix, value.clone(), persistent=False)
    return module._buffers[name + SCALES_SUFFIX]


def get_quant_grid(module: nn.Module, name: str = "weight") -> QuantGridState | None:
    """The grid of ``module.<name>`` (scales, QuantGrid, transposed), or None if it has none."""
    scales, spec = module._buffers.get(name + SCALES_SUFFIX), module._buffers.get(name + SPEC_SUFFIX)
    if scales is None or spec is None:
        return None
    bits, group, transposed = (int(v) for v in spec.tolist())
    return QuantGridState(scales, QuantGrid(bits, group or None), bool(transposed))


def has_quant_grid(module: nn.Module, name: str = "weight") -> bool:
    return get_quant_grid(module, name) is not None


def remove_quant_grid(module: nn.Module, name: str = "weight") -> None:
    """Forget the grid of ``module.<name>`` (the weights are left as they are)."""
    module._buffers.pop(name + SCALES_SUFFIX, None)
    module._buffers.pop(name + SPEC_SUFFIX, None)


def iter_quant_grids(model: nn.Module) -> Iterator[QuantGridParam]:
    """Every parameter of ``model`` with a grid, in module order."""
    for fqn, module in model.named_modules():
        for buffer_name in list(module._buffers):
            if not buffer_name.endswith(SCALES_SUFFIX):
                continue
            name = buffer_name[: -len(SCALES_SUFFIX)]
            state = get_quant_grid(module, name) if isinstance(getattr(module, name, None), nn.Parameter) else None
            if state is not None:
                yield QuantGridParam(fqn, module, name, state=state)
