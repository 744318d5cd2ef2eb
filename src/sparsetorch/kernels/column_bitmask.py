"""Column-major bitmask weights for decode with activation sparsity (TEAL, Liu et al. 2024).

A Linear's input x is sparsified at a magnitude ``threshold`` (entries with ``|x| <= threshold`` count as
zero); y = x_kept @ W^T then only needs the columns of W whose inputs survive. :class:`ColumnBitmaskWeight`
stores W column by column so those are the only bytes read (kernels in csrc/decode_columns.inc), with the
same value types as :class:`~sparsetorch.kernels.bitmask_weight.BitmaskWeight` (int8: one scale per output).

Layout (see csrc/decode.h, ``ColBitmask``): outputs in tiles of 256; entry ``r = t * in + j`` is input column
j within output tile t: ``mask`` int16 [tiles * in, 16] (bit k of word c: W[256 t + 16 c + k, j] kept),
``start`` int64 [tiles * in + 1] (its values are ``values[start[r]:start[r + 1]]``, in output order),
``scales`` fp32 [out] for int8, ``threshold`` a float32 scalar.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SparsityError
from ..formats import index_checks
from . import custom_ops, inference_ops, loader
from .bitmask_weight import VALUE_TYPES, pack_mask, unpack_mask
from .inference_ops import sparsify_input
from .packed import PackedWeight

__all__ = ["ColumnBitmaskWeight", "sparsify_input", "checked_codes", "TILE"]

TILE = 256  # outputs per tile (csrc/decode.h COL_TILE): 16 accumulator vectors at batch 1


def checked_codes(w: torch.Tensor, threshold: float, values: str) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """A column layout's inputs checked: w as fp32 (int8: codes round(w / scale), one symmetric scale per output
    row), its scales (int8, else None) and the threshold."""
    if values not in VALUE_TYPES:
        raise SparsityError(f"unknown value type {values!r}; use one of {sorted(VALUE_TYPES)}")
    threshold = float(threshold)
    if not threshold >= 0 or threshold == float("inf"):
        raise SparsityError(f"activation threshold must be a finite number >= 0, got {threshold}")
    w = w.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise SparsityError("weight has NaN or infinite entries; fix the model before packing it")
    scales = None
    if values == "int8":
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
        w = torch.round(w / scales[:, None]).clamp(-127, 127)
    return w, scales, threshold


class ColumnBitmaskWeight(PackedWeight):
    """W [out, in] stored by columns (bitmask + kept values), applied to its input sparsified at ``threshold``."""

    format = "bitmask-columns"
    kernel_name = "colmask_linear"
    prefill_rows = loader.BITMASK_PREFILL_ROWS  # from here on the rebuilt weight and a dense GEMM

    def __init__(self, mask, start, values, out_features: int, in_features: int, threshold: float,
                 scales=None):
        super().__init__(out_features, in_features)
        self.register_buffer("mask", mask.to(torch.int16).contiguous())
        self.register_buffer("start", start.to(torch.int64).contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", None if scales is None else scales.to(torch.float32).contiguous())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        # whether the kernel skips the columns of zeroed inputs or streams every column (zeros multiplied):
        # measured on a Zen 4 with decode-sized layers out of cache, skipping pays with 16- and 8-bit values
        # (70% pruned bf16, 40% zeroed inputs: 1.34-1.48x) but not with fp32, whose skipped columns cost
        # more in broken memory streams than they save (0.7-0.9x); a speed choice, not saved
        self.skip_columns = self.values.dtype != torch.float32

    @classmethod
    def from_dense(cls, w: torch.Tensor, threshold: float, values: str = "fp32") -> "ColumnBitmaskWeight":
        """Pack w's nonzeros by columns. int8: symmetric scale per output row, values = round(w / scale)."""
        w, scales, threshold = checked_codes(w, threshold, values)
        out, n = w.shape
        tiles = -(-out // TILE)
        padded = torch.zeros(tiles * TILE, n)
        padded[:out] = w
        # entry (t, j): column j of output tile t, its TILE outputs in order
        cols = padded.view(tiles, TILE, n).permute(0, 2, 1).reshape(tiles * n, TILE)
        keep = cols != 0
        kept = cols[keep]
        kept = kept.to(torch.int8) if values == "int8" else kept.to(VALUE_TYPES[values][1])
        start = torch.zeros(tiles * n + 1, dtype=torch.int64)
        start[1:] = keep.sum(1).cumsum(0)
        return cls(pack_mask(keep), start, kept, out, n, threshold, scales)

    # ---------------------------------------------------------------- reference
    @property
    def nnz(self) -> int:
        return int(self.start[-1])

    @property
    def tiles(self) -> int:
        return -(-self.out_features // TILE)

    def to_dense(self) -> torch.Tensor:
        """W [out, in] fp32 (int8 dequantized), zeros in place."""
        keep = unpack_mask(self.mask, TILE)  # [tiles * in, TILE]
        cols = torch.zeros(keep.shape)
        cols[keep] = self.values.float()
        w = cols.view(self.tiles, self.in_features, TILE).permute(0, 2, 1).reshape(-1, self.in_features)
        w = w[:self.out_features]
        return w if self.scales is None else w * self.scales[:, None]

    def _torch_weight(self):
        return self.to_dense().to_sparse_csr()

    def _check_incoming(self, state_dict, prefix):
        name = prefix.rstrip(".") or "ColumnBitmaskWeight"
        mask = self._incoming(state_dict, prefix, "mask")
        values = self._incoming(state_dict, prefix, "values")
        # as a BitmaskWeight of tiles * in rows of TILE entries (int8 scales are per output: checked below)
        index_checks.check_bitmask_weight(name, mask, self._incoming(state_dict, prefix, "start"),
                                          values.view(np.uint8) if values.dtype == np.int8 else values,
                                          self.tiles * self.in_features, TILE)
        past = self.out_features - (self.tiles - 1) * TILE  # outputs the last tile really has, 1..TILE
        if past < TILE:
            last = mask.reshape(self.tiles, self.in_features, -1)[-1].view(np.uint16).astype(np.int64)
            extra = (last[:, past // 16] >> (past % 16)) != 0
            if extra.any() or last[:, past // 16 + 1:].any():
                raise SparsityError(f"{name} mask keeps outputs past its {self.out_features} outputs; the "
                                    "state_dict is corrupted or belongs to another layer", name=name)
        threshold = self._incoming(state_dict, prefix, "threshold")
        if threshold.size != 1 or not float(threshold.reshape(-1)[0]) >= 0:
            raise SparsityError(f"{name} threshold must be one number >= 0", name=name)
        if (values.dtype == np.int8) != (self.scales is not None):
            raise SparsityError(f"{name} has {values.dtype} values for a layer stored with "
                                f"{self.values.dtype}; load a state_dict of the same value type", name=name)
        if self.scales is not None:
            scales = self._incoming(state_dict, prefix, "scales")
            if scales.shape != (self.out_features,) or not (scales > 0).all():
                raise SparsityError(f"{name} scales must be {self.out_features} positive numbers", name=name)

    # ---------------------------------------------------------------- kernels
    def storage_key(self) -> tuple:
        return (*super().storage_key(), self.skip_columns)  # the kernel addresses cached with it change with it

    def _static(self) -> tuple:
        return inference_ops.colmask_static(self.out_features, self.in_features, self.mask, self.start, self.values,
                                            self.scales, self.threshold, self.skip_columns)

    def linear(self, x, bias=None, backend="ext", threads=None):
        """x [B, in] -> sparsify_input(x, threshold) @ W^T + bias."""
        ext = loader.load(loader.INFERENCE) if backend == "ext" else None
        if ext is not None and x.dim() == 2 and x.shape[0] < self.prefill_rows:
            return super().linear(x, bias, backend, threads)
        if ext is None:  # torch's sparse kernel on the same weights (the pure-PyTorch fallback)
            return super().linear(sparsify_input(x.float(), float(self.threshold)), bias, "torch", threads)
        return inference_ops.colmask_prefill(self._static(), x, bias, threads)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.colmask_linear(x, self.mask, self.start, self.values, self.scales, self.threshold, bias,
                                         self.in_features, self.out_features, self.skip_columns, threads or 0)

    def unpack_t(self, threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """W^T [in, out] fp32 rebuilt by the compiled kernel (into ``out`` when given: see BitmaskWeight.unpack)."""
        if loader.load(loader.INFERENCE) is None:
            return self.to_dense().t().contiguous()
        return inference_ops.colmask_to_dense_t(self._static(), out, threads)

    def extra_repr(self) -> str:
        return (f"{self.out_features}, {self.in_features}, nnz={self.nnz}, values={self.values.dtype}, "
                f"threshold={float(self.threshold):.4g}")
