"""y = x @ W^T + b for a loaded weight: the compiled CSR / bitmask kernels when present, else numpy.

The compiled kernels (``sparsetorch/kernels/_C*.so``, pybind11 over raw buffer addresses) are loaded
straight from their file: importing the ``sparsetorch.kernels`` package would import torch.

* dense float32 weights: BLAS (numpy's matmul);
* bitmask weights (and dense ones with bf16 / fp16 / int8 values): the decode kernels read the mask and
  values as stored; from ``BITMASK_MANY_ROWS`` input rows on, weights at most half kept run the sparse x dense
  panel kernel (the torch runtime's prefill kernel), and from ``BITMASK_PREFILL_ROWS`` rows on the others are
  unpacked (compiled) into a reused float32 buffer for one BLAS product;
* CSR weights: the CSR kernel, or gather + reduceat in numpy.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import SparsityError
from ..kernels import loader
from .weights import KERNEL_VTYPES, Weight

BACKENDS = ("auto", "compiled", "numpy", "dense")
# "auto" runs float32 weights denser than this on BLAS (decoded once, at load): a bitmask saves under half the
# bytes there, and BLAS beats the sparse kernels on one row (measured on the 50%-sparse byte GPT,
# benchmarks/bench_edge.py: 1866 tokens/s dense vs 670 on the bitmask kernels; the torch runtime's 50% rows in
# benchmarks/bench_decode.py agree). Sparser weights, and bf16 / fp16 / int8 ones at any density, stay compact.
AUTO_DENSE_ABOVE = 0.35
# From loader.BITMASK_MANY_ROWS input rows on, a bitmask weight with at most this density runs the sparse x
# dense panel kernel (the torch runtime's prefill kernel): at 50% and 2:4 it ran 1.50-1.80x a dense GEMM at
# 512 rows and more at 32 (benchmarks/bench_decode_layers.py --rows); denser ones keep unpack + BLAS.
PANEL_MAX_DENSITY = 0.5
_SCRATCH = threading.local()


def compiled_kernels():
    """The compiled kernel module, or None (not built, or SPARSETORCH_DISABLE_EXT=1)."""
    module = loader.load(loader.INFERENCE)
    return module if hasattr(module, "csr_linear") else None


def bitmask_kernels():
    """The compiled module when it has the bitmask decode kernels, else None."""
    module = compiled_kernels()
    return module if hasattr(module, "bitmask_linear") else None


def _threads_allowed() -> int:
    try:  # OMP_NUM_THREADS caps the kernels' threads as it caps numpy's BLAS
        return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    except ValueError:
        return os.cpu_count() or 1


def _scratch(n: int) -> np.ndarray:
    """A per-thread float32 buffer of at least n elements, reused: fresh pages cost more than the unpack."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        _SCRATCH.buf = buf = np.empty(n, np.float32)
    return buf


class Linear:
    """A fixed sparse or dense weight, prepared once for the chosen backend."""

    def __init__(self, w: Weight, bias: np.ndarray | None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise SparsityError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        if self.bias is not None and self.bias.size != self.out_features:
            raise SparsityError(f"bias has {self.bias.size} values for {self.out_features} outputs; the file is "
                                "corrupted")
        self.weight = w
        kernels = bitmask_kernels() if w.kind == "bitmask" else compiled_kernels()
        if w.kind == "dense":
            backend = "dense"  # stored dense float32: sparse kernels would gain nothing
        elif backend == "auto" and w.vtype == "fp32" and w.density > AUTO_DENSE_ABOVE:
            backend = "dense"
        elif backend == "auto" or (backend == "compiled" and kernels is None):
            backend = "compiled" if kernels is not None else "numpy"
        self.backend = backend
        if backend == "dense":
            self.dense = w.to_dense()  # [out, in]; x @ dense.T runs BLAS on the transposed view, no copy
            self.weight = w if w.kind == "dense" else None  # the compact arrays are not needed any more
            return
        if backend == "compiled":
            self._kernel = kernels
            self._isa = loader.isa_level(loader.INFERENCE)  # SPARSETORCH_ISA caps it, as for torch models
            self._cores = _threads_allowed()
        self.bias_addr = 0 if self.bias is None else self.bias.ctypes.data
        if w.kind == "bitmask":
            addr = lambda a: 0 if a is None else a.ctypes.data  # noqa: E731
            # the weight's addresses, once: the arrays never move, and reading .ctypes costs microseconds per call
            self._fields = (self.out_features, self.in_features, addr(w.mask), w.words, w.row_start.ctypes.data,
                            w.values.ctypes.data, KERNEL_VTYPES[w.vtype], addr(w.scales), w.group)
        elif backend == "compiled":
            indices = w.indices if w.indices.dtype in (np.uint16, np.int32) else w.indices.astype(np.int32)
            self._indices = indices  # kept alive: the kernel reads it through its address
            self._fields = (loader.batch_tile(self.in_features), self.out_features, self.in_features,
                            w.indptr.ctypes.data, indices.ctypes.data, 16 if indices.dtype == np.uint16 else 32,
                            w.values.ctypes.data, w.values.size)
        else:
            self._prepare_numpy_csr(w)

    def __call__(self, x: np.ndarray) -> np.ndarray:  # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        if self.backend == "dense":
            y = self._blas(x2, self.dense)
        elif self.weight.kind == "bitmask":
            y = self._bitmask(x2)
        elif self.backend == "compiled":
            y = self._compiled_csr(x2)
        else:
            y = self._numpy_csr(x2)
        return y.reshape(*lead, self.out_features)

    def _blas(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        y = x @ w.T
        if self.bias is not None:
            y += self.bias
        return y

    def _threads(self, rows: int) -> int:
        # one thread per ~2M multiply-adds: waking an OpenMP team costs more than small products (batch-1 decoding)
        return max(1, min(self._cores, rows * self.weight.nnz // 2_000_000))

    # -- bitmask (decode kernels) ------------------------------------------------------------------------------
    def _bitmask(self, x: np.ndarray) -> np.ndarray:
        n = self.out_features * self.in_features
        if (self.backend == "compiled" and x.shape[0] >= loader.BITMASK_MANY_ROWS and self.weight.mask is not None
                and self.weight.density <= PANEL_MAX_DENSITY):
            y = np.empty((x.shape[0], self.out_features), np.float32)
            self._kernel.bitmask_linear_many(self._isa, self._threads(x.shape[0]), *self._fields, x.ctypes.data,
                                             x.shape[0], x.shape[1], self.bias_addr, y.ctypes.data)
            return y
        if self.backend == "numpy" or x.shape[0] >= loader.BITMASK_PREFILL_ROWS:
            # numpy, or a long prompt: rebuild the dense weight in a reused buffer and run one BLAS product
            if self.backend == "compiled":
                dense = _scratch(n)[:n].reshape(self.out_features, self.in_features)
                self._kernel.bitmask_to_dense(self._isa, self._threads(x.shape[0]), *self._fields, dense.ctypes.data)
            else:
                dense = self.weight.to_dense(out=_scratch(n))
            return self._blas(x, dense)
        y = np.empty((x.shape[0], self.out_features), np.float32)
        if x.shape[0]:
            self._kernel.bitmask_linear(self._isa, self._threads(x.shape[0]), 0, *self._fields, 0, x.ctypes.data,
                                        x.shape[0], x.shape[1], self.bias_addr, y.ctypes.data)
        return y

    # -- CSR -----------------------------------------------------------------------------------------------------
    def _compiled_csr(self, x: np.ndarray) -> np.ndarray:
        y = np.empty((x.shape[0], self.out_features), np.float32)
        if x.shape[0]:
            self._kernel.csr_linear(self._isa, self._threads(x.shape[0]), *self._fields, x.ctypes.data, x.shape[0],
                                    x.shape[1], self.bias_addr, y.ctypes.data)
        return y

    def _prepare_numpy_csr(self, w: Weight) -> None:
        counts = np.diff(w.indptr)
        self._rows = np.flatnonzero(counts)  # rows with a nonzero; reduceat would misreport empty ones
        self._starts = w.indptr[:-1][self._rows]
        self._gather = w.indices.astype(np.intp)
        rows = np.repeat(np.arange(self.out_features), counts)
        flat = rows * self.in_features + self._gather
        self._flat = flat.astype(np.int32) if self.out_features * self.in_features < 2**31 else flat

    def _numpy_csr(self, x: np.ndarray) -> np.ndarray:
        values = self.weight.values
        if x.shape[0] > 2:
            # numpy has no batched sparse product that beats BLAS: scatter this weight into a temporary dense
            # matrix (one layer at a time, so peak memory holds one dense layer) and multiply
            w = np.zeros(self.out_features * self.in_features, np.float32)
            w[self._flat] = values
            return self._blas(x, w.reshape(self.out_features, self.in_features))
        y = np.zeros((x.shape[0], self.out_features), np.float32)
        for b in range(x.shape[0] if self._rows.size else 0):
            # one product per stored weight, summed per row segment: [nnz] -> [rows with a nonzero]
            y[b, self._rows] = np.add.reduceat(x[b, self._gather] * values, self._starts)
        if self.bias is not None:
            y += self.bias
        return y
