"""Bitmask-packed weights for memory-bound LLM decode: one bit per weight plus the kept values.

At 50-90% sparsity this streams fewer bytes than any index format (CSR pays 16 bits per kept weight; the
bitmask pays 1 bit per weight), and an N:M pattern is just a bitmask (2:4 costs 1 bit per weight, the same
as 2-bit in-group positions). Values may be fp32 (exact), bf16 / fp16 (half the value bytes) or int8 with a
scale per row or per group of columns. With int8 values, ``quantize_input=True`` also quantizes the
activations (sign and an 8-bit magnitude, one scale per 256 columns: ``quantize_activations``) and runs AVX-512
VNNI dot products (where the CPU has VNNI and VBMI2).

Layout (kernels in csrc/decode_impl.inc, csrc/decode_vnni.cpp): ``mask`` int16 [out, ceil(in/16)] whose bit
j of word c says W[o, 16c+j] is kept; ``row_start`` int64 [out+1]; ``values`` the kept values row by row in
column order; ``scales`` fp32 [out, groups] for int8.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SparsityError
from ..formats import index_checks
from . import custom_ops, inference_ops, loader
from .packed import PackedWeight

__all__ = ["BitmaskWeight", "VALUE_TYPES", "has_vnni", "has_int8_activations"]

VALUE_TYPES = {"fp32": (0, torch.float32), "bf16": (1, torch.bfloat16), "fp16": (2, torch.float16),
               "int8": (3, torch.int8)}
PREFILL_ROWS = loader.BITMASK_MANY_ROWS  # from this many input rows on, the prefill path (bitmask_prefill)
_BITS = torch.tensor([1 << j for j in range(16)], dtype=torch.int32)


def has_vnni() -> bool:
    """Whether the int8 x int8 kernel can run here (AVX-512 VNNI + VBMI2, compiled kernels built)."""
    ext = loader.load(loader.INFERENCE)
    return bool(ext is not None and hasattr(ext, "has_vnni") and ext.has_vnni()
                and inference_ops.isa_level() == 2)


def has_int8_activations() -> bool:
    """Whether ``quantize_input=True`` layers run here: the VNNI kernel, or the AVX2 one (csrc/decode_q8_avx2.cpp,
    the same sums) on CPUs without it."""
    ext = loader.load(loader.INFERENCE)
    return bool(ext is not None and inference_ops.isa_level() >= 1)


ACT_GROUP = 256  # input columns per activation scale of the int8 x int8 kernel (csrc/decode.h QX_GROUP)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [B, in] as the int8 x int8 kernel sees it: per row and group of ACT_GROUP columns, the sign and
    round(|x| / s) in 0..255 (half to even) with s = max |x| / 255, times s. Sign and magnitude give twice the
    levels of a code + 128; a group's scale keeps an outlier from coarsening the rest of the row."""
    b, n = x.shape
    ng = -(-n // ACT_GROUP)
    g = torch.zeros(b, ng * ACT_GROUP)
    g[:, :n] = x
    g = g.view(b, ng, ACT_GROUP)
    s = g.abs().amax(-1, keepdim=True) / 255
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(g.abs() * (1 / s)).clamp_max(255)
    return (torch.sign(g) * codes * s).view(b, -1)[:, :n]


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """[out, in] bool -> int16 [out, ceil(in/16)] with bit j of word c = keep[:, 16c + j]."""
    out, n = keep.shape
    words = (n + 15) // 16
    padded = torch.zeros(out, words * 16, dtype=torch.int32)
    padded[:, :n] = keep.to(torch.int32)
    packed = (padded.view(out, words, 16) * _BITS).sum(-1)  # [out, words] in [0, 65536)
    return torch.where(packed >= 32768, packed - 65536, packed).to(torch.int16)


def unpack_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    bits = (mask.to(torch.int32).unsqueeze(-1) & _BITS) != 0  # [out, words, 16]
    return bits.reshape(mask.shape[0], -1)[:, :n]


class BitmaskWeight(PackedWeight):
    """W [out, in] as bitmask + kept values (fp32, bf16, fp16 or int8 with scales)."""

    format = "bitmask"
    kernel_name = "bitmask_linear"
    prefill_rows = PREFILL_ROWS  # PackedLinear sends this many rows or more to linear(), not the fast path

    def __init__(self, mask, row_start, values, out_features: int, in_features: int, scales=None,
                 group: int = 0, quantize_input: bool = False):
        super().__init__(out_features, in_features)
        self.dense_values = mask is None
        self.register_buffer("mask", None if mask is None else mask.to(torch.int16).contiguous())
        self.register_buffer("row_start", row_start.to(torch.int64).contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", None if scales is None else scales.to(torch.float32).contiguous())
        self.group = int(group)
        self.quantize_input = bool(quantize_input)

    # ---------------------------------------------------------------- packing
    @classmethod
    def from_dense(cls, w: torch.Tensor, values: str = "fp32", group_size: int | None = None,
                   quantize_input: bool = False, dense: bool = False) -> "BitmaskWeight":
        """Pack w's nonzeros (all of w with ``dense=True``: a dense fp32/bf16/int8 layer without a mask).

        int8: symmetric scales per row (``group_size=None``) or per group of ``group_size`` columns (a
        multiple of 16; of 64 with ``quantize_input``), values = round(w / scale)."""
        if values not in VALUE_TYPES:
            raise SparsityError(f"unknown value type {values!r}; use one of {sorted(VALUE_TYPES)}")
        if quantize_input and values != "int8":
            raise SparsityError("quantize_input needs values='int8'")
        w = w.detach().to("cpu", torch.float32)
        if not torch.isfinite(w).all():
            raise SparsityError("weight has NaN or infinite entries; fix the model before packing it")
        out, n = w.shape
        keep = torch.ones_like(w, dtype=torch.bool) if dense else w != 0
        scales, group = None, 0
        if values == "int8":
            unit = 64 if quantize_input else 16
            group = -(-n // unit) * unit if group_size is None else int(group_size)
            if group % unit:
                raise SparsityError(f"group_size must be a multiple of {unit}", got=group_size)
            ng = -(-n // group)
            wp = torch.zeros(out, ng * group)
            wp[:, :n] = w
            scales = (wp.view(out, ng, group).abs().amax(-1) / 127).clamp_min(1e-12)  # [out, ng]
            codes = torch.round(wp.view(out, ng, group) / scales.unsqueeze(-1)).clamp(-127, 127).view(out, -1)[:, :n]
            kept = codes[keep].to(torch.int8)
        else:
            kept = w[keep].to(VALUE_TYPES[values][1])
        counts = keep.sum(1)
        row_start = torch.zeros(out + 1, dtype=torch.int64)
        row_start[1:] = counts.cumsum(0)
        mask = None if dense else pack_mask(keep)
        return cls(mask, row_start, kept, out, n, scales, group, quantize_input)

    @staticmethod
    def concatenable(parts: list["BitmaskWeight"]) -> bool:
        """Whether ``concat`` takes ``parts``: the same inputs, value type, scale groups, activation handling
        and mask (or none)."""
        first = parts[0]
        return all(p.in_features == first.in_features and p.values.dtype == first.values.dtype
                   and p.group == first.group and p.quantize_input == first.quantize_input
                   and p.dense_values == first.dense_values for p in parts[1:])

    @classmethod
    def concat(cls, parts: list["BitmaskWeight"]) -> "BitmaskWeight":
        """One weight with the rows of ``parts`` one after another (see ``concatenable``): several Linears fed
        the same input run as one kernel call."""
        if not cls.concatenable(parts):
            raise SparsityError("bitmask weights concatenated by rows need the same inputs, value type, scale "
                                "groups and activation handling", got=[repr(q) for q in parts])
        first = parts[0]
        counts = torch.cat([p.row_start.diff() for p in parts])
        row_start = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        row_start[1:] = counts.cumsum(0)
        mask = None if first.mask is None else torch.cat([p.mask for p in parts])
        scales = None if first.scales is None else torch.cat([p.scales for p in parts])
        return cls(mask, row_start, torch.cat([p.values for p in parts]), int(counts.numel()), first.in_features,
                   scales, first.group, first.quantize_input)

    def rows(self, r0: int, r1: int) -> "BitmaskWeight":
        """Rows [r0, r1) as a weight whose buffers are views of this one's (only row_start is new)."""
        a, b = int(self.row_start[r0]), int(self.row_start[r1])
        return BitmaskWeight(None if self.mask is None else self.mask[r0:r1], self.row_start[r0:r1 + 1] - a,
                             self.values[a:b], r1 - r0, self.in_features,
                             None if self.scales is None else self.scales[r0:r1], self.group, self.quantize_input)

    def _keep(self) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.out_features, self.in_features, dtype=torch.bool)
        return unpack_mask(self.mask, self.in_features)

    def _codes_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features)
        dense[self._keep()] = self.values.float()
        return dense

    def to_dense(self) -> torch.Tensor:
        dense = self._codes_dense()
        if self.scales is not None:
            scale = self.scales.repeat_interleave(self.group, dim=1)[:, :self.in_features]
            dense = dense * scale
        return dense

    def _torch_weight(self):
        return self.to_dense().to_sparse_csr()

    def _check_incoming(self, state_dict, prefix):
        get = lambda name: None if getattr(self, name) is None else self._incoming(state_dict, prefix, name)  # noqa: E731
        values = self._incoming(state_dict, prefix, "values")
        if self.values.dtype == torch.int8 and values.dtype != np.int8:
            values = values.astype(np.int8)  # load_state_dict copies into our int8 buffer: only the count matters
        index_checks.check_bitmask_weight(prefix.rstrip(".") or "BitmaskWeight", get("mask"), get("row_start"),
                                          values, self.out_features, self.in_features, get("scales"), self.group)

    # ---------------------------------------------------------------- kernels
    @property
    def nnz(self) -> int:
        return int(self.row_start[-1])

    def _static(self) -> tuple:
        return inference_ops.bitmask_static(self.out_features, self.in_features, self.mask, self.row_start,
                                            self.values, self.scales, self.group, self.quantize_input)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.bitmask_linear(x, self.mask, self.row_start, self.values, self.scales, bias,
                                         self.in_features, self.out_features, self.group, self.quantize_input,
                                         threads or 0)

    def linear(self, x, bias=None, backend="ext", threads=None):
        if backend == "ext":
            if x.dim() == 2 and x.shape[0] >= self.prefill_rows and loader.load(loader.INFERENCE) is not None:
                return inference_ops.bitmask_many_rows(self._static(), self.mask, self.values, x, bias, threads)
            return super().linear(x, bias, backend, threads)
        return torch.nn.functional.linear(x.float(), self.to_dense(), None if bias is None else bias.float())

    def unpack(self, threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense fp32 weight (zeros in place), rebuilt by the compiled kernel; into ``out`` (at least
        out_features * in_features fp32 elements, contiguous) when given, avoiding a fresh allocation whose
        page faults cost more than the rebuild itself."""
        if not inference_ops.available():
            return self.to_dense()
        out = torch.empty(self.out_features * self.in_features) if out is None else out
        return inference_ops.bitmask_to_dense(self._static(), out, threads)

    def extra_repr(self) -> str:
        kind = "dense" if self.mask is None else f"nnz={self.nnz}"
        q = ", int8 activations" if self.quantize_input else ""
        return f"{self.out_features}, {self.in_features}, {kind}, values={self.values.dtype}{q}"
