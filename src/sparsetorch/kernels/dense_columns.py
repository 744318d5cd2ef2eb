"""Dense weights stored by whole columns, for decode with activation sparsity (TEAL) where sparse weights do not pay.

W^T [in, out] in fp32 / bf16 / fp16 / int8 (one scale per output), applied to its input sparsified at a magnitude
``threshold``: a zeroed input skips its whole column of W, ``out`` values in one piece. The tiled
:class:`~sparsetorch.kernels.column_bitmask.ColumnBitmaskWeight` skips a column in pieces of 256 outputs, gaps the
hardware prefetchers fetch anyway: on a Zen 3 (AVX2, 2 threads, out of cache) a dense int8 5632 x 2048 layer with
40% of its inputs zeroed at random ran no faster in such tiles than with none zeroed, while zeroed runs of 32 and
more columns saved their share. On a CPU without AVX-512 a 70%-pruned int8 layer is fastest dense (expanding its
mask costs more than its bytes save), so this is the layout in which activation sparsity pays there. Kernel:
``coldense_columns`` in csrc/decode_columns.inc, through the ``colmask_linear`` entry with no mask.
"""
from __future__ import annotations

import torch

from ..errors import SparsityError
from . import custom_ops, inference_ops, loader
from .bitmask_weight import VALUE_TYPES
from .column_bitmask import checked_codes
from .inference_ops import sparsify_input
from .packed import PackedWeight

__all__ = ["DenseColumnWeight"]

_NO_INDEX = {"mask": torch.empty(0, dtype=torch.int16), "start": torch.empty(0, dtype=torch.int64)}


class DenseColumnWeight(PackedWeight):
    """W [out, in] stored as W^T (every entry, zeros too), applied to its input sparsified at ``threshold``."""

    format = "dense-columns"
    kernel_name = "colmask_linear"
    prefill_rows = loader.BITMASK_PREFILL_ROWS  # from here on one dense GEMM over W^T

    def __init__(self, values: torch.Tensor, out_features: int, in_features: int, threshold: float,
                 scales: torch.Tensor | None = None):
        super().__init__(out_features, in_features)
        # [in, out]; a view of a sibling group's wider values (columns values.stride(0) apart) stays a view
        self.register_buffer("values", values if values.dim() == 2 and values.stride(1) == 1 else values.contiguous())
        self.register_buffer("scales", None if scales is None else scales.to(torch.float32).contiguous())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    @classmethod
    def from_dense(cls, w: torch.Tensor, threshold: float, values: str = "fp32") -> "DenseColumnWeight":
        """W^T in ``values``. int8: symmetric scale per output row, values = round(w / scale)."""
        w, scales, threshold = checked_codes(w, threshold, values)
        return cls(w.t().contiguous().to(VALUE_TYPES[values][1]), w.shape[0], w.shape[1], threshold, scales)

    @staticmethod
    def concatenable(parts: list["DenseColumnWeight"]) -> bool:
        """Whether ``concat`` takes ``parts``: the same inputs, value type and threshold."""
        first = parts[0]
        return all(type(p) is DenseColumnWeight and p.in_features == first.in_features
                   and p.values.dtype == first.values.dtype and (p.scales is None) == (first.scales is None)
                   and float(p.threshold) == float(first.threshold) for p in parts)

    @classmethod
    def concat(cls, parts: list["DenseColumnWeight"]) -> "DenseColumnWeight":
        """One weight with the outputs of ``parts`` one after another: Linears fed the same input (q/k/v,
        gate/up) as one call, whose columns are also longer gaps to skip."""
        if not cls.concatenable(parts):
            raise SparsityError("dense column weights concatenated by outputs need the same inputs, value type "
                                "and threshold", got=[repr(q) for q in parts])
        scales = None if parts[0].scales is None else torch.cat([p.scales for p in parts])
        return cls(torch.cat([p.values for p in parts], 1), sum(p.out_features for p in parts), parts[0].in_features,
                   float(parts[0].threshold), scales)

    def rows(self, r0: int, r1: int) -> "DenseColumnWeight":
        """Outputs [r0, r1) as a weight whose values and scales are views of this one's."""
        return DenseColumnWeight(self.values[:, r0:r1], r1 - r0, self.in_features, float(self.threshold),
                                 None if self.scales is None else self.scales[r0:r1])

    def to_dense(self) -> torch.Tensor:
        """W [out, in] fp32 (int8 dequantized)."""
        w = self.values.float().t()
        return (w if self.scales is None else w * self.scales[:, None]).contiguous()

    def _check_incoming(self, state_dict, prefix):
        name = prefix.rstrip(".") or "DenseColumnWeight"
        values = self._incoming(state_dict, prefix, "values")
        if values.shape != (self.in_features, self.out_features):
            raise SparsityError(f"{name} values must be [{self.in_features}, {self.out_features}] (W transposed), "
                                f"got {list(values.shape)}; the state_dict belongs to another layer", name=name)
        if (values.dtype.kind == "i") != (self.values.dtype == torch.int8):
            raise SparsityError(f"{name} has {values.dtype} values for a layer stored with {self.values.dtype}; "
                                "load a state_dict of the same value type", name=name)
        if self.scales is not None:
            scales = self._incoming(state_dict, prefix, "scales")
            if scales.shape != (self.out_features,) or not (scales > 0).all():
                raise SparsityError(f"{name} scales must be {self.out_features} positive numbers", name=name)
        threshold = self._incoming(state_dict, prefix, "threshold")
        if threshold.size != 1 or not float(threshold.reshape(-1)[0]) >= 0:
            raise SparsityError(f"{name} threshold must be one number >= 0", name=name)

    # ---------------------------------------------------------------- kernels
    def _static(self) -> tuple:
        return inference_ops.coldense_static(self.out_features, self.in_features, self.values, self.scales,
                                             self.threshold)

    def linear(self, x, bias=None, backend="ext", threads=None):
        """x [B, in] -> sparsify_input(x, threshold) @ W^T + bias."""
        ext = loader.load(loader.INFERENCE) if backend == "ext" else None
        if ext is not None and x.dim() == 2 and x.shape[0] < self.prefill_rows:
            return super().linear(x, bias, backend, threads)
        if ext is None:  # the pure-PyTorch fallback
            return torch.nn.functional.linear(sparsify_input(x.float(), float(self.threshold)), self.to_dense(), bias)
        return inference_ops.coldense_prefill(self.values, self.scales, float(self.threshold), x, bias)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.colmask_linear(x, _NO_INDEX["mask"], _NO_INDEX["start"], self.values, self.scales,
                                         self.threshold, bias, self.in_features, self.out_features, True, threads or 0)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, values={self.values.dtype}, threshold={float(self.threshold):.4g}"
