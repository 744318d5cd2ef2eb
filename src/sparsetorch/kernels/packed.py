"""Packed sparse weights for Y = X @ W^T, W [out, in], and the two ways to multiply with them.

Three formats, each an ``nn.Module`` holding its arrays as buffers (so ``.to()``/``state_dict`` work):

* :class:`CSRWeight`: unstructured; values fp32 + column indices of 16 bits when ``in <= 65536``
  (stored as int16 holding the uint16 bit pattern), 32 bits otherwise; int64 row pointers.
* :class:`NMWeight`: N of every M consecutive inputs kept; values + uint8 offset inside each group, no pointers.
* :class:`BSRWeight`: R x C blocks; block values [nblocks, R, C] + block-column indices.

``linear(x, bias, backend)``: backend "ext" runs the compiled kernels (sparsetorch.kernels._C), "torch"
the fallback on torch's own sparse kernels (CSR / BSR with int32 indices via ``torch.sparse.mm(W, X^T)^T``,
the fast form on CPU; int64 indices and ``F.linear(X, W_csr)`` are several times slower).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import SparsityError
from ..formats import index_checks
from . import custom_ops, inference_ops


# The kernels read 16-bit column indices as unsigned, so layers up to this many inputs use them
# (torch has no uint16 tensors: they are stored as int16 bit patterns).
MAX_INDEX16 = 65536


def _uint16_as_int16(cols: torch.Tensor) -> torch.Tensor:
    """Column indices < MAX_INDEX16 as int16 bit patterns; the kernels read them back as unsigned."""
    cols = cols.to(torch.int32)
    return torch.where(cols >= MAX_INDEX16 // 2, cols - MAX_INDEX16, cols).to(torch.int16)


def index_bits(n: int) -> int:
    """Width of the column indices: 16 bits while every index fits in uint16, else 32."""
    return 16 if n <= MAX_INDEX16 else 32


def _indices(cols: torch.Tensor, n: int) -> torch.Tensor:
    return _uint16_as_int16(cols) if index_bits(n) == 16 else cols.to(torch.int32)


def _unsigned(indices: torch.Tensor) -> torch.Tensor:
    idx = indices.to(torch.int64)
    return torch.where(idx < 0, idx + 65536, idx) if indices.dtype == torch.int16 else idx


class PackedWeight(nn.Module):
    """Common part: shape, dense reconstruction and the torch fallback cache."""

    format = "dense"

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        self._torch_cache: tuple[tuple, torch.Tensor] | None = None
        self._ext_cache: tuple[tuple, tuple] | None = None

    def __getstate__(self):  # copies and pickles drop the caches (a torch sparse tensor cannot be deep-copied)
        state = dict(super().__getstate__())
        state["_torch_cache"] = state["_ext_cache"] = None
        return state

    def storage_key(self) -> tuple:
        """Identity of the arrays' current contents: addresses and in-place versions of every buffer, so
        caches built from them are rebuilt after .to(), load_state_dict or any in-place change."""
        # _buffers, not buffers(): this runs before every eager call, and the generator walk costs microseconds
        return tuple((b.data_ptr(), b._version) for b in self._buffers.values() if b is not None)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes a batch-1 call streams (all buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def _torch_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def torch_weight(self) -> torch.Tensor:
        """torch sparse tensor (int32 indices) for the fallback, rebuilt only when the buffers change."""
        key = self.storage_key()
        if self._torch_cache is None or self._torch_cache[0] != key:
            with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta" and invariant-check notes
                warnings.simplefilter("ignore", UserWarning)
                self._torch_cache = (key, self._torch_weight())
        return self._torch_cache[1]

    def _static(self) -> tuple:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "ext",
               threads: int | None = None) -> torch.Tensor:
        """x [B, in] -> [B, out]; threads (compiled kernels only) defaults to torch.get_num_threads()."""
        if backend == "ext":
            # addresses of the weight arrays, recomputed only when the buffers change (see storage_key)
            key = self.storage_key()
            if self._ext_cache is None or self._ext_cache[0] != key:
                self._ext_cache = (key, self._static())
            if x.dtype != torch.float32:
                x = x.float()
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                bias = bias.float().contiguous()
            return inference_ops.call(self.kernel_name, self._ext_cache[1], x, bias, threads=threads)
        y = torch.sparse.mm(self.torch_weight(), x.float().t()).t()  # [B, out]
        return y if bias is None else y + bias

    def op_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
        """x [B, in] -> fp32 [B, out] on the compiled kernel through its ``torch.ops.sparsetorch`` operator: what
        ``torch.compile`` traces without a graph break (eager calls are cheaper through ``linear``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, nnz={self.nnz}"

    # ------------------------------------------------------------------ loading (issue #20)
    def _incoming(self, state_dict, prefix: str, name: str):
        """The array ``name`` as this load would leave it: the state_dict's tensor, else the current buffer."""
        t = state_dict.get(prefix + name, getattr(self, name))
        if not isinstance(t, torch.Tensor):
            raise SparsityError(f"{prefix}{name} is a {type(t).__name__}, expected a tensor; the state_dict is "
                                "corrupted or was edited", key=prefix + name)
        t = t.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # bfloat16 / float8 values: numpy has no such dtype, only their count is checked
        return t.numpy()

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """Validate the index buffers a load would set; the compiled kernels index raw memory with them."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # before anything is copied: a failure leaves this module as it was (and its caches valid)
        self._check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class CSRWeight(PackedWeight):
    format = "csr"

    def __init__(self, indptr, indices, values, out_features: int, in_features: int):
        super().__init__(out_features, in_features)
        self.register_buffer("indptr", indptr.to(torch.int64).contiguous())
        self.register_buffer("indices", indices.contiguous())
        self.register_buffer("values", values.to(torch.float32).contiguous())

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "CSRWeight":
        w = w.detach().to("cpu", torch.float32)
        out, inp = w.shape
        rows, cols = (w != 0).nonzero(as_tuple=True)  # row-major order
        indptr = torch.zeros(out + 1, dtype=torch.int64)
        indptr[1:] = torch.bincount(rows, minlength=out).cumsum(0)
        return cls(indptr, _indices(cols, inp), w[rows, cols], out, inp)

    @property
    def bits(self) -> int:
        return 16 if self.indices.dtype == torch.int16 else 32

    def to_dense(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.indptr.diff())
        w = torch.zeros(self.out_features, self.in_features)
        w[rows, _unsigned(self.indices)] = self.values
        return w

    def _torch_weight(self):
        return torch.sparse_csr_tensor(self.indptr.to(torch.int32), _unsigned(self.indices).to(torch.int32),
                                       self.values, (self.out_features, self.in_features))

    kernel_name = "csr_linear"

    def _check_incoming(self, state_dict, prefix):
        index_checks.check_csr_weight(prefix.rstrip(".") or "CSRWeight", *(
            self._incoming(state_dict, prefix, n) for n in ("indptr", "indices", "values")),
            self.out_features, self.in_features)

    def _static(self):
        return inference_ops.csr_static(self.indptr, self.indices, self.values, self.out_features, self.in_features)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.csr_linear(x, self.indptr, self.indices, self.values, bias, self.in_features,
                                     self.out_features, threads or 0)


class NMWeight(PackedWeight):
    format = "nm"

    def __init__(self, values, offsets, n: int, m: int, in_features: int):
        super().__init__(values.shape[0], in_features)
        self.n, self.m = int(n), int(m)
        self.register_buffer("values", values.to(torch.float32).contiguous())  # [out, in/m*n]
        self.register_buffer("offsets", offsets.to(torch.uint8).contiguous())  # [out, in/m*n], in [0, m)

    @staticmethod
    def group_count(w: torch.Tensor, m: int) -> int:
        """Most nonzeros in any group of m consecutive inputs (the smallest n that packs w as n:m)."""
        out, inp = w.shape
        return int((w != 0).reshape(out, inp // m, m).sum(-1).max()) if w.numel() else 0

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int, m: int) -> "NMWeight":
        w = w.detach().to("cpu", torch.float32)
        out, inp = w.shape
        if not (1 <= n <= m <= 256) or inp % m:
            raise SparsityError(f"{n}:{m} needs 1 <= n <= m <= 256 and in_features ({inp}) divisible by m; pick another "
                                "N:M or prune with pattern=\"unstructured\"")
        if cls.group_count(w, m) > n:
            raise SparsityError(f"weight has groups of {m} with more than {n} nonzeros; prune it with pattern=\"{n}:{m}\" first")
        groups = w.reshape(out, inp // m, m)
        # nonzeros first (stable, so in input order), then padding zeros; keep the first n of each group
        order = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :n]
        vals = torch.gather(groups, -1, order)
        return cls(vals.reshape(out, -1), order.reshape(out, -1), n, m, inp)

    def to_dense(self) -> torch.Tensor:
        out, g = self.out_features, self.in_features // self.m
        w = torch.zeros(out, g, self.m)
        w.scatter_add_(-1, self.offsets.reshape(out, g, self.n).long(), self.values.reshape(out, g, self.n))
        return w.reshape(out, self.in_features)

    def _torch_weight(self):
        csr = CSRWeight.from_dense(self.to_dense())
        return csr._torch_weight()

    kernel_name = "nm_linear"

    def _check_incoming(self, state_dict, prefix):
        index_checks.check_nm_weight(prefix.rstrip(".") or "NMWeight", self._incoming(state_dict, prefix, "values"),
                                     self._incoming(state_dict, prefix, "offsets"), self.n, self.m,
                                     self.out_features, self.in_features)

    def _static(self):
        return inference_ops.nm_static(self.values, self.offsets, self.n, self.m, self.in_features)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.nm_linear(x, self.values, self.offsets, bias, self.in_features, self.n, self.m, threads or 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.n}:{self.m}"


class BSRWeight(PackedWeight):
    format = "bsr"

    def __init__(self, indptr, indices, values, out_features: int, in_features: int):
        super().__init__(out_features, in_features)
        self.register_buffer("indptr", indptr.to(torch.int64).contiguous())
        self.register_buffer("indices", indices.contiguous())
        self.register_buffer("values", values.to(torch.float32).contiguous())  # [nblocks, R, C]

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @staticmethod
    def blocks(w: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """[out/r, in/c, r, c] view of the blocks of w."""
        out, inp = w.shape
        return w.reshape(out // r, r, inp // c, c).permute(0, 2, 1, 3)

    @classmethod
    def from_dense(cls, w: torch.Tensor, r: int, c: int) -> "BSRWeight":
        w = w.detach().to("cpu", torch.float32)
        out, inp = w.shape
        if out % r or inp % c:
            raise SparsityError(f"block {r}x{c} does not tile a {out}x{inp} weight; choose a block that divides both sizes")
        blocks = cls.blocks(w, r, c)
        keep = (blocks != 0).any(-1).any(-1)  # [out/r, in/c]
        brow, bcol = keep.nonzero(as_tuple=True)
        indptr = torch.zeros(out // r + 1, dtype=torch.int64)
        indptr[1:] = torch.bincount(brow, minlength=out // r).cumsum(0)
        values = blocks[brow, bcol].reshape(-1, r, c)
        return cls(indptr, _indices(bcol, inp // c), values, out, inp)

    def to_dense(self) -> torch.Tensor:
        r, c = self.block
        brow = torch.repeat_interleave(torch.arange(self.out_features // r), self.indptr.diff())
        w = torch.zeros(self.out_features // r, self.in_features // c, r, c)
        w[brow, _unsigned(self.indices)] = self.values
        return w.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def _torch_weight(self):
        return torch.sparse_bsr_tensor(self.indptr.to(torch.int32), _unsigned(self.indices).to(torch.int32),
                                       self.values, (self.out_features, self.in_features))

    kernel_name = "bsr_linear"

    def _check_incoming(self, state_dict, prefix):
        index_checks.check_bsr_weight(prefix.rstrip(".") or "BSRWeight", *(
            self._incoming(state_dict, prefix, n) for n in ("indptr", "indices", "values")),
            self.out_features, self.in_features)

    def _static(self):
        return inference_ops.bsr_static(self.indptr, self.indices, self.values, self.out_features, self.in_features)

    def op_linear(self, x, bias=None, threads=None):
        return custom_ops.bsr_linear(x, self.indptr, self.indices, self.values, bias, self.in_features,
                                     self.out_features, threads or 0)

    def extra_repr(self) -> str:
        r, c = self.block
        return f"{super().extra_repr()}, block={r}x{c}"


class DenseWeight(PackedWeight):
    """Every entry stored, transposed: for layers inside a fused chain that are too dense to gain from an
    index. ``values`` is W^T [in, out rounded up to 16] (zero columns pad each row to whole vectors)."""

    format = "dense"

    def __init__(self, values: torch.Tensor, out_features: int):
        super().__init__(out_features, values.shape[0])
        self.register_buffer("values", values.detach().to("cpu", torch.float32).contiguous())  # [in, ldw]

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "DenseWeight":
        out, inp = w.shape
        wt = torch.zeros(inp, (out + 15) // 16 * 16)
        wt[:, :out] = w.detach().to("cpu", torch.float32).t()
        return cls(wt, out)

    @property
    def nnz(self) -> int:
        return int((self.values != 0).sum())

    def to_dense(self) -> torch.Tensor:
        return self.values[:, :self.out_features].t().contiguous()

    def _static(self):
        return (self.out_features, self.in_features, self.values.data_ptr(), self.values.shape[1])

    def linear(self, x, bias=None, backend="ext", threads=None):
        y = x.float() @ self.values[:, :self.out_features]
        return y if bias is None else y + bias


def pack(w: torch.Tensor, fmt: str = "csr", **kw) -> PackedWeight:
    """Pack a dense (zeros = pruned) weight: fmt "csr", "nm" (n=, m=) or "bsr" (r=, c=)."""
    if fmt == "csr":
        return CSRWeight.from_dense(w)
    if fmt == "nm":
        return NMWeight.from_dense(w, kw["n"], kw["m"])
    if fmt == "bsr":
        return BSRWeight.from_dense(w, kw["r"], kw["c"])
    raise SparsityError(f"unknown packed format {fmt!r}; use 'csr', 'nm' or 'bsr'")
