"""SparseLinear: a Linear layer whose weight only exists compressed (CSR), trained without the dense matrix.

Storage (also the state_dict format, all tensors):

    values   [nnz]      the kept weights, the layer's nn.Parameter (optimizers see nnz numbers, not out*in)
    indptr   [out + 1]  int64 row pointers: row o owns values[indptr[o]:indptr[o+1]]
    indices  [nnz]      column of each value, sorted within a row; int16 when in_features <= 32768, else int32
    bias     [out]      as nn.Linear (absent with bias=False)

nnz is fixed per layer; dynamic sparse training (SET / RigL) rewrites indptr/indices/values in place. The
input gradient dX = dY W reads W by rows, scattering into dX, so nothing else is stored; only layers at most
``TRANSPOSED_MAP_MAX_DENSITY`` dense also derive a transposed index map (t_indptr, t_indices, t_perm: W read by
columns, a gather), recomputed when the connectivity changes and never saved. Loading a state_dict that holds a dense
``weight`` [out, in] instead (e.g. from ``to_dense``) keeps its nnz largest-magnitude entries.

Rows or columns with no kept weight are allowed: an empty row outputs its bias, an empty column's input
gets no gradient.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.rng import resolve_generator
from ..errors import SparsityError
from ..formats.index_checks import check_csr_weight
from ..kernels import training_ops
from .functional import SparseLinearFunction, row_ids

BACKENDS = ("auto", "kernels", "torch")
# dX by gather over a transposed index map (6 bytes per kept weight) or by scatter over the CSR rows (no extra
# memory). 4096x4096 layer, 256 rows, 2 threads: scatter 1.24x the gather's time at 10% density, 1.4-1.5x at
# 1-5% (benchmarks/bench_input_grad.py). Layers at most 5% dense keep the map: it is small there (<= 5 MB for
# 4096x4096) and buys the most; denser layers save the memory.
TRANSPOSED_MAP_MAX_DENSITY = 0.05
TRANSPOSED_MAP_BUFFERS = ("t_indptr", "t_indices", "t_perm")  # never saved; empty in layers without the map
DTYPES = (torch.float32, torch.float64)


# Signed int16 indices, so at most this many columns: the training step widens them with torch
# (.to(torch.int64) sign-extends), unlike the inference formats' unsigned 16-bit indices (packed.MAX_INDEX16).
INT16_COLUMNS = 32768


def index_dtype(dim: int) -> torch.dtype:
    """Narrowest index type for positions 0..dim-1: int16 up to INT16_COLUMNS, else int32."""
    return torch.int16 if dim <= INT16_COLUMNS else torch.int32


def transposed_map(indptr: torch.Tensor, indices: torch.Tensor, in_features: int,
                   out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSC view of a CSR pattern: (t_indptr [in + 1] int64, t_indices [nnz] row of each entry, t_perm [nnz]
    int32 CSR position of each entry), entries sorted by column (stably: rows stay sorted within a column)."""
    cols = indices.to(torch.int64)
    perm = torch.argsort(cols, stable=True)
    t_indptr = torch.zeros(in_features + 1, dtype=torch.int64, device=indptr.device)
    torch.cumsum(torch.bincount(cols, minlength=in_features), 0, out=t_indptr[1:])
    return t_indptr, row_ids(indptr)[perm].to(index_dtype(out_features)), perm.to(torch.int32)


def sample_positions(numel: int, k: int, exclude: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """k distinct flat positions in [0, numel), uniformly at random, none in ``exclude`` (int64); unsorted.

    Rejection sampling, so no [numel] buffer exists unless most positions are wanted anyway."""
    free = numel - (0 if exclude is None else exclude.numel())
    if k > free:
        raise SparsityError(f"cannot choose {k} new positions: only {free} are free", k=k, free=free)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    if 2 * k > free:  # dense enough that one permutation is cheaper than rejection
        pool = torch.arange(numel)
        if exclude is not None and exclude.numel():
            pool = pool[~torch.isin(pool, exclude)]
        return pool[torch.randperm(pool.numel(), generator=generator)[:k]]
    chosen = torch.zeros(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        cand = torch.unique(torch.randint(numel, (2 * need + 16,), generator=generator))
        cand = cand[~torch.isin(cand, chosen)]
        if exclude is not None and exclude.numel():
            cand = cand[~torch.isin(cand, exclude)]
        # the distinct values of uniform draws are a uniform random subset; a random part of it is too
        cand = cand[torch.randperm(cand.numel(), generator=generator)[:need]]
        chosen = torch.cat([chosen, cand])
    return chosen


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W [out, in] stored as CSR (see the module docstring for the format).

    Build it with ``SparseLinear(in, out, sparsity=0.9)`` (random connectivity, nn.Linear's init at the kept
    positions), ``SparseLinear.from_dense(linear, sparsity=...)`` or ``sparsetorch.to_sparse_training(model)``.
    ``backend``: "auto" (compiled kernels for float32/float64 CPU inputs when built, else torch sparse ops),
    "kernels" (error if they cannot run) or "torch".
    """

    def __init__(self, in_features: int, out_features: int, sparsity: float = 0.9, bias: bool = True, *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise SparsityError(f"SparseLinear supports float32 and float64 weights, got {dtype}; convert the "
                                "model with .float() before to_sparse_training", dtype=str(dtype))
        if in_features < 1 or out_features < 1:
            raise SparsityError(f"SparseLinear needs positive sizes, got in={in_features}, out={out_features}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise SparsityError(f"sparsity must lie in [0, 1), got {sparsity}", sparsity=sparsity)
        if backend not in BACKENDS:
            raise SparsityError(f"backend must be one of {BACKENDS}, got {backend!r}", backend=backend)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        numel = in_features * out_features
        nnz = max(1, round((1.0 - float(sparsity)) * numel))
        gen = resolve_generator(generator)
        flat = sample_positions(numel, nnz, None, gen).sort().values
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound for the dense weight
        values = (torch.rand(nnz, generator=gen, dtype=dtype) * 2 - 1) * bound
        self.values = nn.Parameter(values.to(device))
        self.register_buffer("indptr", torch.zeros(out_features + 1, dtype=torch.int64, device=device))
        self.register_buffer("indices", torch.zeros(nnz, dtype=index_dtype(in_features), device=device))
        for name in TRANSPOSED_MAP_BUFFERS:  # filled by _refresh_transpose where used
            self.register_buffer(name, torch.zeros(0, dtype=torch.int64, device=device), persistent=False)
        self.set_connectivity(flat.to(device))
        if bias:
            self.bias = nn.Parameter(((torch.rand(out_features, generator=gen, dtype=dtype) * 2 - 1) * bound).to(device))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction / conversion
    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: float, *, init: str = "random",
                   generator: torch.Generator | None = None, backend: str = "auto") -> "SparseLinear":
        """A SparseLinear keeping ``1 - sparsity`` of ``linear``'s weights: a random set (``init="random"``,
        the start of sparse training) or the largest magnitudes (``init="magnitude"``), with their values."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, sparsity, linear.bias is not None, generator=generator,
                    dtype=w.dtype, device=w.device, backend=backend)
        if init == "magnitude":
            flat = torch.topk(w.abs().flatten(), layer.nnz, sorted=False).indices.sort().values
            layer.set_connectivity(flat)
        elif init != "random":
            raise SparsityError(f"init must be 'random' or 'magnitude', got {init!r}", init=init)
        with torch.no_grad():
            layer.values.copy_(w.flatten()[layer.flat_positions()])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def rescale_by_fan_in_(self) -> "SparseLinear":
        """Sparsity-aware init (Evci et al. 2022): scale each row's kept values by sqrt(in / kept fan-in), so
        the output variance is the dense layer's rather than density times it. Returns self."""
        kept = self.indptr.diff()                                           # [out]
        scale = torch.sqrt(self.in_features / kept.clamp(min=1).to(self.values.dtype))
        self.values.mul_(torch.repeat_interleave(scale, kept))
        return self

    def to_linear(self) -> nn.Linear:
        """The equivalent dense nn.Linear (zeros at the pruned positions)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ connectivity
    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def flat_positions(self) -> torch.Tensor:
        """Row-major flat index (row * in + col) of each value, [nnz] int64, sorted."""
        return row_ids(self.indptr) * self.in_features + self.indices.to(torch.int64)

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] materialised (detached). For export and tests; training never needs it."""
        w = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        w[self.flat_positions()] = self.values.detach()
        return w.view(self.out_features, self.in_features)

    @torch.no_grad()
    def set_connectivity(self, flat: torch.Tensor) -> None:
        """Point the index buffers at the sorted flat positions ``flat`` [nnz] (values are not touched)."""
        flat = flat.to(self.indptr.device, torch.int64)
        if flat.numel() != self.nnz:
            raise SparsityError(f"expected {self.nnz} positions, got {flat.numel()}")
        rows, cols = flat // self.in_features, flat % self.in_features
        counts = torch.bincount(rows, minlength=self.out_features)
        self.indptr[0] = 0
        torch.cumsum(counts, 0, out=self.indptr[1:])
        self.indices.copy_(cols.to(self.indices.dtype))
        self._refresh_transpose()

    @property
    def has_transposed_map(self) -> bool:
        """Whether dX = dY W reads W by columns through t_indptr/t_indices/t_perm (layers at most
        TRANSPOSED_MAP_MAX_DENSITY dense) rather than scattering over W's rows."""
        return self.density <= TRANSPOSED_MAP_MAX_DENSITY + 1e-9  # a 95%-sparse layer rounds to about 0.05

    @torch.no_grad()
    def _refresh_transpose(self) -> None:
        if self.has_transposed_map:
            maps = transposed_map(self.indptr, self.indices, self.in_features, self.out_features)
        else:
            maps = [torch.zeros(0, dtype=torch.int64, device=self.indptr.device)] * 3
        for name, t in zip(TRANSPOSED_MAP_BUFFERS, maps):
            setattr(self, name, t)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"SparseLinear expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise SparsityError(f"input dtype {x.dtype} does not match the layer's {self.values.dtype}; cast one "
                                "of them (SparseLinear supports float32 and float64)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        use = self.backend != "torch" and training_ops.supports(x2)
        if self.backend == "kernels" and not use:
            raise SparsityError("backend='kernels' needs the compiled extension (sparsetorch.kernels._train) and "
                                "float32/float64 CPU inputs; use backend='auto' to fall back to torch")
        y = SparseLinearFunction.apply(x2, self.values, self.bias, self, use)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(density {self.density:.3g}), bias={self.bias is not None}")

    # ------------------------------------------------------------------ state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dense = state_dict.get(prefix + "weight")
        if dense is not None and prefix + "values" not in state_dict:
            # a dense checkpoint (nn.Linear / to_dense): keep its nnz largest-magnitude weights
            if tuple(dense.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: dense shape {tuple(dense.shape)} does not match "
                                  f"({self.out_features}, {self.in_features})")
                return
            state_dict = dict(state_dict)
            flat = torch.topk(dense.abs().flatten(), self.nnz, sorted=False).indices.sort().values
            rows, cols = flat // self.in_features, flat % self.in_features
            indptr = torch.zeros(self.out_features + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(rows, minlength=self.out_features), 0, out=indptr[1:])
            del state_dict[prefix + "weight"]
            state_dict[prefix + "values"] = dense.flatten()[flat]
            state_dict[prefix + "indptr"] = indptr
            state_dict[prefix + "indices"] = cols.to(self.indices.dtype)
        self._check_incoming(state_dict, prefix)  # before anything changes: the kernels trust these indices
        values = state_dict.get(prefix + "values")
        if values is not None and values.numel() != self.nnz and values.dim() == 1:
            self._resize(values.numel())  # a checkpoint of another density: take its nnz
        ind = state_dict.get(prefix + "indices")
        if ind is not None and ind.dtype != self.indices.dtype:
            state_dict = dict(state_dict)
            state_dict[prefix + "indices"] = ind.to(self.indices.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_transpose()

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """The connectivity this load would set (the state_dict's tensors, else the current ones) must be a
        valid CSR of an out x in weight (issue #20: hostile files never reach the kernels)."""
        arrays = []
        for name in ("indptr", "indices", "values"):
            t = state_dict.get(prefix + name, getattr(self, name))
            if not isinstance(t, torch.Tensor):
                raise SparsityError(f"{prefix}{name} is a {type(t).__name__}, expected a tensor; the checkpoint is "
                                    "corrupted or was edited", key=prefix + name)
            t = t.detach().cpu()
            odd = t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64)
            arrays.append((t.float() if odd else t).numpy())  # bfloat16 values: numpy lacks it, count only
        check_csr_weight(prefix.rstrip(".") or "SparseLinear", *arrays, self.out_features, self.in_features)

    def _resize(self, nnz: int) -> None:
        dev = self.values.device
        self.values = nn.Parameter(torch.zeros(nnz, dtype=self.values.dtype, device=dev))
        self.indices = torch.zeros(nnz, dtype=self.indices.dtype, device=dev)
