"""y = x @ W^T + b for a decoded weight: compiled CSR kernel when present, else numpy (CSR or dense).

The compiled kernels (``sparsetorch/kernels/_C*.so``, pybind11 over raw buffer addresses) are loaded
straight from their file: importing the ``sparsetorch.kernels`` package would import torch.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import SparsityError
from ..kernels import loader
from .weights import Matrix

BACKENDS = ("auto", "compiled", "numpy", "dense")
# "auto" keeps weights denser than this dense in memory: CSR (4 B value + 2 B index per nonzero) saves
# little there, and BLAS beats the sparse kernels (measured on the 50%-sparse GPT: benchmarks/bench_edge.py)
AUTO_DENSE_ABOVE = 0.35


def compiled_kernels():
    """The compiled kernel module, or None (not built, or SPARSETORCH_DISABLE_EXT=1)."""
    module = loader.load(loader.INFERENCE)
    return module if hasattr(module, "csr_linear") else None


def _threads_allowed() -> int:
    try:  # OMP_NUM_THREADS caps the kernels' threads as it caps numpy's BLAS
        return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    except ValueError:
        return os.cpu_count() or 1


class Linear:
    """A fixed sparse or dense weight, prepared once for the chosen backend."""

    def __init__(self, w: Matrix, bias: np.ndarray | None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise SparsityError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        if self.bias is not None and self.bias.size != self.out_features:
            raise SparsityError(f"bias has {self.bias.size} values for {self.out_features} outputs; the file is "
                                "corrupted")
        kernels = compiled_kernels()
        if w.dense is not None:
            backend = "dense"  # stored dense: sparse kernels would gain nothing
        elif backend == "auto" and w.density > AUTO_DENSE_ABOVE:
            backend = "dense"
        elif backend == "auto" or (backend == "compiled" and kernels is None):
            backend = "compiled" if kernels is not None else "numpy"
        self.backend = backend
        if backend == "dense":
            self.weight_t = np.ascontiguousarray(w.to_dense().T)  # [in, out]
            return
        self.indptr, self.values = w.indptr, w.values
        self.indices = w.indices if w.indices.dtype in (np.uint16, np.int32) else w.indices.astype(np.int32)
        if backend == "compiled":
            self._kernel = kernels
            self._isa = loader.isa_level(loader.INFERENCE)  # SPARSETORCH_ISA caps it, as for torch models
            self._cores = _threads_allowed()
            self._bits = 16 if self.indices.dtype == np.uint16 else 32
        else:
            counts = np.diff(self.indptr)
            self._rows = np.flatnonzero(counts)  # rows with a nonzero; reduceat would misreport empty ones
            self._starts = self.indptr[:-1][self._rows]
            self._gather = self.indices.astype(np.intp)
            rows = np.repeat(np.arange(self.out_features), counts)
            flat = rows * self.in_features + self._gather
            self._flat = flat.astype(np.int32) if self.out_features * self.in_features < 2**31 else flat

    def __call__(self, x: np.ndarray) -> np.ndarray:  # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        if self.backend == "dense":
            y = x2 @ self.weight_t
            if self.bias is not None:
                y += self.bias
        elif self.backend == "compiled":
            y = self._compiled(x2)
        else:
            y = self._numpy_csr(x2)
        return y.reshape(*lead, self.out_features)

    def _compiled(self, x: np.ndarray) -> np.ndarray:
        y = np.empty((x.shape[0], self.out_features), np.float32)
        # one thread per ~2M multiply-adds: waking an OpenMP team costs more than small products (batch-1 decoding)
        threads = max(1, min(self._cores, x.shape[0] * self.values.size // 2_000_000))
        if x.shape[0]:
            self._kernel.csr_linear(
                self._isa, threads, loader.batch_tile(self.in_features), self.out_features, self.in_features,
                self.indptr.ctypes.data, self.indices.ctypes.data, self._bits, self.values.ctypes.data,
                self.values.size, x.ctypes.data, x.shape[0], x.shape[1],
                0 if self.bias is None else self.bias.ctypes.data, y.ctypes.data)
        return y

    def _numpy_csr(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] > 2:
            # numpy has no batched sparse product that beats BLAS: scatter this weight into a temporary dense
            # matrix (one layer at a time, so peak memory holds one dense layer) and multiply
            w = np.zeros(self.out_features * self.in_features, np.float32)
            w[self._flat] = self.values
            y = x @ w.reshape(self.out_features, self.in_features).T
        else:
            y = np.zeros((x.shape[0], self.out_features), np.float32)
            for b in range(x.shape[0] if self._rows.size else 0):
                # one product per stored weight, summed per row segment: [nnz] -> [rows with a nonzero]
                y[b, self._rows] = np.add.reduceat(x[b, self._gather] * self.values, self._starts)
        if self.bias is not None:
            y += self.bias
        return y
