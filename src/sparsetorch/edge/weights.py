"""Weight matrices in an edge file: numpy encode (used by the exporter) and load (used by the runtime).

A weight is stored as a 2-D matrix W [out, in] (conv kernels flattened to [out, in*k...]) in one of
three layouts, whichever takes fewest bytes:

* ``dense``:   ``values`` [out, in]
* ``csr``:     ``indptr`` int32 [out+1], ``indices`` uint16 (int32 when in > 65536) [nnz], ``values`` [nnz]
* ``bitmask`` (format version 3, the compiled decode kernels' own layout, see csrc/decode.h and
  ``sparsetorch.kernels.bitmask_weight``): ``mask`` int16 [out, ceil(in/16)] whose bit j of word c says
  W[o, 16c+j] is kept, ``row_start`` int64 [out+1], ``values`` [nnz] row by row in column order.
  Versions 1 and 2 stored ``bits`` uint8 [ceil(out*in/8)] (np.packbits of W != 0, row-major) instead of
  mask and row_start; such files are converted to the kernel layout once, at load.

``values`` are float32, bfloat16 (stored as its uint16 bit patterns: numpy has no bfloat16), float16, or
int8 with a float32 ``scale`` [out] per row (symmetric: w ~ q * scale[row], scale = max|w_row| / 127).
Arrays are saved under ``"<name>/<part>"``.

In memory (:class:`Weight`) a bitmask weight, and a dense one with 16-bit or int8 values, stays exactly as
stored (mask + values + scales: no CSR, no dequantized copy); the compiled kernels read 1 bit per weight and
convert bf16 / fp16 / int8 in registers. CSR weights (only chosen below ~6% density) hold float32 values,
the one type the CSR kernels read.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from ..errors import SparsityError


def _load_index_checks():
    """sparsetorch.formats.index_checks without importing sparsetorch.formats (whose __init__ imports torch)."""
    name = "sparsetorch.formats.index_checks"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "formats" / "index_checks.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


checks = _load_index_checks()

LAYOUTS = ("dense", "csr", "bitmask")
VALUE_TYPES = ("fp32", "bf16", "fp16", "int8")
FILE_DTYPES = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.float16, "int8": np.int8}
KERNEL_VTYPES = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}  # csrc/decode.h ValueType
FP16_MAX = 65504.0


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (q int8 [out, in], scale float32 [out]); |w - q*scale| <= scale/2."""
    amax = np.abs(w).max(axis=1) if w.size else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def to_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch's ``.to(torch.bfloat16)``."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack_mask(keep: np.ndarray) -> np.ndarray:
    """[out, in] bool -> int16 [out, ceil(in/16)], bit j of word c = keep[:, 16c + j] (numpy twin of
    ``sparsetorch.kernels.bitmask_weight.pack_mask``)."""
    out, n = keep.shape
    words = (n + 15) // 16
    padded = np.zeros((out, words * 16), bool)
    padded[:, :n] = keep
    return np.packbits(padded.reshape(out, words * 2, 8), axis=-1, bitorder="little").reshape(out, -1).view("<i2")


def unpack_mask(mask: np.ndarray, n: int) -> np.ndarray:
    """int16 [rows, ceil(n/16)] -> bool [rows, n]."""
    as_bytes = np.ascontiguousarray(mask).view(np.uint8).reshape(mask.shape[0], -1)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :n].astype(bool)


def _stored(w: np.ndarray, values: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(values as stored [out, in], kept [out, in] bool, int8 scale [out] or None)."""
    if values == "int8":
        q, scale = quantize_rows(w)
        return q, q != 0, scale  # a weight that rounds to 0 is pruned in effect: keep the int8 matrix's pattern
    if values == "bf16":
        bits = to_bf16(w)
        return bits, (bits & np.uint16(0x7FFF)) != 0, None
    if values == "fp16":
        if w.size and float(np.abs(w).max()) > FP16_MAX:
            raise SparsityError(f"values='fp16' cannot hold a weight of magnitude {float(np.abs(w).max()):.4g} (fp16 "
                                f"tops out at {FP16_MAX:g}); export with values='bf16' or 'fp32'")
        half = w.astype(np.float16)
        return half, half != 0, None
    return w, w != 0, None


def encode_matrix(w: np.ndarray, values: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Smallest layout for a 2-D float matrix: (arrays by part name, JSON meta)."""
    if values not in VALUE_TYPES:
        raise SparsityError(f"values must be one of {VALUE_TYPES}, got {values!r}", values=values)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise SparsityError("a weight holds NaN or infinite entries; fix the model before exporting it")
    out, inp = w.shape
    stored, nz, scale = _stored(w, values)
    nnz = int(nz.sum())
    item = stored.dtype.itemsize
    index_dtype = np.uint16 if inp <= 65536 else np.int32
    sizes = {
        "dense": out * inp * item,
        "csr": (out + 1) * 4 + nnz * (np.dtype(index_dtype).itemsize + item),
        "bitmask": out * ((inp + 15) // 16) * 2 + (out + 1) * 8 + nnz * item,
    }
    layout = min(LAYOUTS, key=lambda k: (sizes[k], LAYOUTS.index(k)))
    parts: dict[str, np.ndarray] = {}
    if layout == "dense":
        parts["values"] = stored
    else:
        parts["values"] = np.ascontiguousarray(stored[nz])  # row-major order = CSR order = the kernels' order
        counts = nz.sum(axis=1)
        if layout == "csr":
            parts["indptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            parts["indices"] = np.nonzero(nz)[1].astype(index_dtype)
        else:
            parts["mask"] = pack_mask(nz)
            parts["row_start"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if scale is not None:
        parts["scale"] = scale
    meta = {"shape": [out, inp], "layout": layout, "values": values, "nnz": nnz}
    return parts, meta


def weights_version(tensors: dict[str, dict]) -> int:
    """The oldest edge format version that reads these weights: 3 for the kernel bitmask layout or 16-bit
    float values, else 1."""
    new = any(m["layout"] == "bitmask" or m["values"] in ("bf16", "fp16") for m in tensors.values())
    return 3 if new else 1


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + counts[i]) as one int64 index array."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    offsets = np.repeat(starts.astype(np.int64) - np.cumsum(counts) + counts, counts)
    return offsets + np.arange(total, dtype=np.int64)


class Weight:
    """A weight as the runtime holds it, one of three kinds:

    * ``"dense"``: float32 ``dense`` [out, in];
    * ``"csr"``: ``indptr`` int64 [out+1], ``indices`` uint16 / int32, ``values`` float32;
    * ``"bitmask"``: the decode kernels' layout, ``mask`` int16 [out, ceil(in/16)] (None: every weight kept,
      a dense matrix of 16-bit or int8 values), ``row_start`` int64 [out+1], ``values`` as stored
      (``vtype`` fp32 / bf16 as uint16 / fp16 / int8) and, for int8, ``scales`` float32 [out, 1].
    """

    def __init__(self, shape: tuple[int, int], kind: str, *, dense=None, indptr=None, indices=None, values=None,
                 mask=None, row_start=None, vtype: str = "fp32", scales=None):
        self.shape, self.kind, self.vtype = shape, kind, vtype
        self.dense, self.indptr, self.indices, self.values = dense, indptr, indices, values
        self.mask, self.row_start, self.scales = mask, row_start, scales

    @property
    def words(self) -> int:
        return (self.shape[1] + 15) // 16

    @property
    def group(self) -> int:
        """int8 scale group in columns: the whole row (rounded up to 16, as the kernels require)."""
        return self.words * 16 if self.scales is not None else 0

    @property
    def nnz(self) -> int:
        return self.shape[0] * self.shape[1] if self.kind == "dense" else int(self.values.size)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (what a batch-1 product streams)."""
        parts = (self.dense, self.indptr, self.indices, self.values, self.mask, self.row_start, self.scales)
        return sum(a.nbytes for a in parts if a is not None)

    def float_values(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The kept values as float32 (int8 times its row's scale), of every row or of ``rows``."""
        if rows is None:
            vals, counts, row_ids = self.values, np.diff(self.row_start if self.kind == "bitmask" else self.indptr), None
        else:
            ptr = self.row_start if self.kind == "bitmask" else self.indptr
            counts = ptr[rows + 1] - ptr[rows]
            vals, row_ids = self.values[_ranges(ptr[rows], counts)], rows
        if self.vtype == "bf16":
            return bf16_to_float(vals)
        if self.vtype == "int8":
            scale = self.scales[:, 0] if row_ids is None else self.scales[row_ids, 0]
            return vals.astype(np.float32) * np.repeat(scale, counts)
        return vals.astype(np.float32, copy=False)

    def to_dense(self, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [out, in] (zeros in place); into ``out`` (a float32 buffer of at least out*in) when given."""
        if self.kind == "dense":
            return self.dense
        rows, cols = self.shape
        w = np.zeros((rows, cols), np.float32) if out is None else out.reshape(-1)[:rows * cols].reshape(rows, cols)
        if out is not None:
            w.fill(0)
        return self._scatter(w, np.arange(rows), self.float_values())

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape, values in [0, out)) as float32 [*ids.shape, in]: an embedding lookup that
        decodes only the rows it needs, so compact embedding tables stay compact."""
        flat = np.asarray(ids, np.int64).reshape(-1)
        if self.kind == "dense":
            got = self.dense[flat]
        else:
            got = self._scatter(np.zeros((flat.size, self.shape[1]), np.float32), flat, self.float_values(flat))
        return got.reshape(*np.shape(ids), self.shape[1])

    def _scatter(self, w: np.ndarray, rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """Write the kept values of ``rows`` (in that order) into the zeroed ``w`` [rows.size, in]."""
        if self.kind == "csr":
            counts = self.indptr[rows + 1] - self.indptr[rows]
            cols = self.indices[_ranges(self.indptr[rows], counts)].astype(np.int64)
            w[np.repeat(np.arange(rows.size), counts), cols] = vals
        elif self.mask is None:
            w[:] = vals.reshape(rows.size, self.shape[1])
        else:
            w[unpack_mask(self.mask[rows], self.shape[1])] = vals  # row-major boolean order = value order
        return w


def _incomplete(name: str, exc: Exception) -> SparsityError:
    return SparsityError(f"weight {name!r} is incomplete in the edge file ({exc}); it is corrupted")


def decode_matrix(name: str, arrays: dict[str, np.ndarray], meta: dict) -> Weight:
    """The runtime's :class:`Weight` for the parts ``encode_matrix`` wrote (or an older version's).

    Everything read from the file is validated first (shape, dtypes, CSR pointers and indices, mask words,
    row starts against the mask's popcounts, value counts, scales): these arrays go to compiled kernels
    that index raw memory with them. The checks are ``sparsetorch.formats.index_checks``', the ones the torch
    side's ``BitmaskWeight`` / ``CSRWeight`` loading runs."""
    try:
        if not isinstance(meta, dict):
            raise TypeError(f"meta is {type(meta).__name__}")
        out, inp = checks.check_shape(f"weight {name!r}", meta["shape"], ndim=2)
        layout, kind = meta["layout"], meta["values"]
        values = arrays["values"]
        scale = arrays["scale"] if kind == "int8" else None
    except SparsityError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise _incomplete(name, exc) from None
    if kind not in FILE_DTYPES:
        raise SparsityError(f"weight {name!r} has value type {kind!r}, expected one of {VALUE_TYPES}; "
                            "the file is corrupted or newer")
    checks.check_dtype(f"weight {name!r} values", values, (FILE_DTYPES[kind],))
    values = np.ascontiguousarray(values.reshape(-1))
    scales = None
    if scale is not None:
        checks.check_dtype(f"weight {name!r} scale", scale, (np.float32,))
        checks.check_size(f"weight {name!r} scale", scale, out)
        scales = np.ascontiguousarray(scale, dtype=np.float32).reshape(out, 1)
    if layout == "dense":
        checks.check_size(f"weight {name!r} values", values, out * inp)
        if kind == "fp32":
            return Weight((out, inp), "dense", dense=values.reshape(out, inp))
        # 16-bit or int8 values stay compact: the decode kernels run them with no mask (every weight kept)
        return _bitmask(name, out, inp, None, np.arange(out + 1, dtype=np.int64) * inp, values, kind, scales)
    if layout == "csr":
        return _csr(name, out, inp, arrays, values, kind, scales)
    if layout != "bitmask":
        raise SparsityError(f"weight {name!r} has unknown layout {layout!r}; the file is corrupted or newer")
    if "mask" in arrays and "row_start" in arrays:
        mask = arrays["mask"]
        checks.check_dtype(f"weight {name!r} mask", mask, (np.int16,))
        need = out * ((inp + 15) // 16) * 2
        if mask.nbytes != need:  # before any reshape or popcount: the claimed shape must fit what is stored
            raise SparsityError(f"weight {name!r} mask has {mask.nbytes} bytes for {out}x{inp} weights (expected "
                                f"{need}); the file is corrupted")
        mask, row_start = np.ascontiguousarray(mask).reshape(out, -1), np.ascontiguousarray(arrays["row_start"])
    elif "bits" in arrays:  # format versions 1-2: np.packbits over the whole matrix
        # checked on the packed bytes before unpacking: the bits' length must match the claimed shape, so a
        # tiny file cannot make us allocate a huge mask
        checks.check_bitmask(f"weight {name!r} bitmask", arrays["bits"].reshape(-1), out * inp, values.size)
        keep = np.unpackbits(arrays["bits"].reshape(-1), count=out * inp).reshape(out, inp).astype(bool)
        mask, row_start = pack_mask(keep), np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    else:
        raise SparsityError(f"weight {name!r} lacks its bitmask; the file is corrupted")
    return _bitmask(name, out, inp, mask, row_start, values, kind, scales)


def _bitmask(name, out, inp, mask, row_start, values, kind, scales) -> Weight:
    checks.check_bitmask_weight(f"weight {name!r}", mask, row_start.reshape(-1), values, out, inp, scales,
                                (inp + 15) // 16 * 16 if scales is not None else 0)
    return Weight((out, inp), "bitmask", mask=mask, row_start=row_start.reshape(-1), values=values, vtype=kind,
                  scales=scales)


def _csr(name, out, inp, arrays, values, kind, scales) -> Weight:
    if "indptr" not in arrays or "indices" not in arrays:
        raise SparsityError(f"weight {name!r} lacks its CSR arrays; the file is corrupted")
    indptr, indices = arrays["indptr"].reshape(-1), arrays["indices"].reshape(-1)
    checks.check_dtype(f"weight {name!r} row pointers", indptr, (np.int32, np.int64))
    checks.check_dtype(f"weight {name!r} column indices", indices, (np.uint16, np.int32))
    checks.check_csr(f"weight {name!r}", indptr, indices, out, inp, nnz=values.size)
    if indices.dtype == np.uint16 and inp > 65536:
        raise SparsityError(f"weight {name!r} has 16-bit column indices for {inp} columns; the file is corrupted")
    w = Weight((out, inp), "csr", indptr=indptr.astype(np.int64), indices=np.ascontiguousarray(indices),
               values=values, vtype=kind, scales=scales)
    # the CSR kernels read float32 values: convert once (CSR is only chosen below ~6% density, so this is small)
    w.values, w.vtype, w.scales = np.ascontiguousarray(w.float_values()), "fp32", None
    return w
