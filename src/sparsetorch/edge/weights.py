"""Weight matrices in an edge file: numpy encode (used by the exporter) and decode (used by the runtime).

A weight is stored as a 2-D matrix W [out, in] (conv kernels flattened to [out, in*k...]) in one of
three layouts, whichever takes fewest bytes:

* ``dense``:   ``values`` [out, in]
* ``csr``:     ``indptr`` int32 [out+1], ``indices`` uint16 (int32 when in > 65536) [nnz], ``values`` [nnz]
* ``bitmask``: ``bits`` uint8 [ceil(out*in/8)] (np.packbits of W != 0, row-major), ``values`` [nnz]

``values`` are float32, or int8 with a float32 ``scale`` [out] per row (symmetric: w ~ q * scale[row],
scale = max|w_row| / 127). Arrays are saved under ``"<name>/<part>"``.
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
VALUE_TYPES = ("fp32", "int8")


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (q int8 [out, in], scale float32 [out]); |w - q*scale| <= scale/2."""
    amax = np.abs(w).max(axis=1) if w.size else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def encode_matrix(w: np.ndarray, values: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Smallest layout for a 2-D float matrix: (arrays by part name, JSON meta)."""
    if values not in VALUE_TYPES:
        raise SparsityError(f"values must be one of {VALUE_TYPES}, got {values!r}", values=values)
    w = np.ascontiguousarray(w, dtype=np.float32)
    out, inp = w.shape
    scale = None
    if values == "int8":
        q, scale = quantize_rows(w)
        # a weight that rounds to 0 is pruned in effect; keep the sparsity pattern of the int8 matrix
        stored, nz = q, q != 0
    else:
        stored, nz = w, w != 0
    nnz = int(nz.sum())
    item = stored.dtype.itemsize
    index_dtype = np.uint16 if inp <= 65536 else np.int32
    sizes = {
        "dense": out * inp * item,
        "csr": (out + 1) * 4 + nnz * (np.dtype(index_dtype).itemsize + item),
        "bitmask": (out * inp + 7) // 8 + nnz * item,
    }
    layout = min(LAYOUTS, key=lambda k: (sizes[k], LAYOUTS.index(k)))
    parts: dict[str, np.ndarray] = {}
    if layout == "dense":
        parts["values"] = stored
    else:
        parts["values"] = np.ascontiguousarray(stored[nz])  # row-major order = CSR order
        if layout == "csr":
            rows, cols = np.nonzero(nz)
            parts["indptr"] = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=out))]).astype(np.int32)
            parts["indices"] = cols.astype(index_dtype)
        else:
            parts["bits"] = np.packbits(nz.reshape(-1))
    if scale is not None:
        parts["scale"] = scale
    meta = {"shape": [out, inp], "layout": layout, "values": values, "nnz": nnz}
    return parts, meta


class Matrix:
    """A decoded weight for the runtime: CSR arrays (indptr int64, indices, values float32) and/or dense."""

    def __init__(self, shape: tuple[int, int], indptr, indices, values, dense=None):
        self.shape = shape
        self.indptr, self.indices, self.values, self.dense = indptr, indices, values, dense

    @property
    def density(self) -> float:
        return 1.0 if self.dense is not None else self.values.size / max(1, self.shape[0] * self.shape[1])

    def to_dense(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        out, inp = self.shape
        w = np.zeros((out, inp), np.float32)
        rows = np.repeat(np.arange(out), np.diff(self.indptr))
        w[rows, self.indices.astype(np.int64)] = self.values
        return w


VALUE_DTYPES = {"fp32": (np.float32,), "int8": (np.int8,)}


def decode_matrix(name: str, arrays: dict[str, np.ndarray], meta: dict) -> Matrix:
    """Inverse of :func:`encode_matrix` (int8 values are dequantized to float32 here, once).

    Everything read from the file is validated first (shape, dtypes, CSR pointers and indices, bitmask
    length and popcount): these arrays go to compiled kernels that index raw memory with them."""
    try:
        if not isinstance(meta, dict):
            raise TypeError(f"meta is {type(meta).__name__}")
        out, inp = checks.check_shape(f"weight {name!r}", meta["shape"], ndim=2)
        layout, kind = meta["layout"], meta["values"]
        values = arrays["values"]
        scale = arrays["scale"] if kind == "int8" else None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SparsityError):
            raise
        raise SparsityError(f"weight {name!r} is incomplete in the edge file ({exc}); it is corrupted") from None
    if kind not in VALUE_DTYPES:
        raise SparsityError(f"weight {name!r} has value type {kind!r}, expected one of {VALUE_TYPES}; "
                            "the file is corrupted or newer")
    checks.check_dtype(f"weight {name!r} values", values, VALUE_DTYPES[kind])
    if scale is not None:
        checks.check_dtype(f"weight {name!r} scale", scale, (np.float32,))
        checks.check_size(f"weight {name!r} scale", scale, out)
        scale = scale.astype(np.float32).reshape(-1)
    values = values.reshape(-1)
    if layout == "dense":
        checks.check_size(f"weight {name!r} values", values, out * inp)
        w = values.astype(np.float32).reshape(out, inp)
        if scale is not None:
            w = w * scale[:, None]
        return Matrix((out, inp), None, None, None, dense=np.ascontiguousarray(w, dtype=np.float32))
    if layout == "csr":
        if "indptr" not in arrays or "indices" not in arrays:
            raise SparsityError(f"weight {name!r} lacks its CSR arrays; the file is corrupted")
        indptr, indices = arrays["indptr"].reshape(-1), arrays["indices"].reshape(-1)
        checks.check_dtype(f"weight {name!r} row pointers", indptr, (np.int32, np.int64))
        checks.check_dtype(f"weight {name!r} column indices", indices, (np.uint16, np.int32))
        checks.check_csr(f"weight {name!r}", indptr, indices, out, inp, nnz=values.size)
        indptr = indptr.astype(np.int64)
    elif layout == "bitmask":
        if "bits" not in arrays:
            raise SparsityError(f"weight {name!r} lacks its bitmask; the file is corrupted")
        # checked on the packed bytes before unpacking: the unpacked mask is out*inp bytes, and the bits'
        # length must match the claimed shape, so a tiny file cannot make us allocate a huge mask
        checks.check_bitmask(f"weight {name!r} bitmask", arrays["bits"].reshape(-1), out * inp, values.size)
        nz = np.unpackbits(arrays["bits"].reshape(-1), count=out * inp).reshape(out, inp).astype(bool)
        indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))]).astype(np.int64)
        indices = np.nonzero(nz)[1].astype(np.uint16 if inp <= 65536 else np.int32)
    else:
        raise SparsityError(f"weight {name!r} has unknown layout {layout!r}; the file is corrupted or newer")
    if indices.dtype == np.uint16 and inp > 65536:
        raise SparsityError(f"weight {name!r} has 16-bit column indices for {inp} columns; the file is corrupted")
    vals = values.astype(np.float32)
    if scale is not None:
        vals = vals * np.repeat(scale, np.diff(indptr))
    return Matrix((out, inp), indptr, np.ascontiguousarray(indices), np.ascontiguousarray(vals, dtype=np.float32))
