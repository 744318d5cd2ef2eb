"""The three products of a sparse Linear layer, W [out, in] stored as CSR with nnz values:

    forward   Y  = X W^T        (B x in) . (in x out), sparse x dense        -> SpMM on CSR
    input     dX = dY W         (B x out) . (out x in), W read by rows       -> scatter SpMM (or, for very sparse
                                                                              layers, SpMM on a transposed map)
    weight    dW_k = sum_b dY[b, r_k] X[b, c_k] at the kept positions only   -> SDDMM (never the dense dY^T X)

Each runs in the compiled kernels (float32 / float64 on CPU) or, without them, on torch sparse CSR
matmuls and a chunked gather (any device torch's CSR supports). Both give the same numbers up to
summation order.
"""
from __future__ import annotations

import warnings

import torch

from . import _kernels, growth

# fallback SDDMM: at most this many [B, chunk] products alive at once
_GATHER_ELEMENTS = 1 << 22


def row_ids(indptr: torch.Tensor) -> torch.Tensor:
    """Row of each nonzero, [nnz] int64, from CSR row pointers."""
    counts = indptr[1:] - indptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)


def _csr(indptr, indices, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr, indices.to(torch.int64), values, size=shape, check_invariants=False)


def torch_forward(x, values, layer) -> torch.Tensor:
    # Y^T [out, B] = W [out, in] @ X^T [in, B]
    w = _csr(layer.indptr, layer.indices, values, (layer.out_features, layer.in_features))
    return (w @ x.t()).t()


def torch_input_grad(dy, values, layer) -> torch.Tensor:
    # dX^T [in, B] = W^T [in, out] @ dY^T [out, B]; W^T of a CSR tensor is the CSC view of the same buffers
    w = _csr(layer.indptr, layer.indices, values, (layer.out_features, layer.in_features))
    return (w.t() @ dy.t()).t()


def torch_weight_grad(dy, x, layer) -> torch.Tensor:
    rows, cols = row_ids(layer.indptr), layer.indices.to(torch.int64)
    chunk = max(1, _GATHER_ELEMENTS // max(1, x.shape[0]))
    parts = [(dy[:, rows[s:s + chunk]] * x[:, cols[s:s + chunk]]).sum(0) for s in range(0, rows.numel(), chunk)]
    return torch.cat(parts) if parts else dy.new_zeros(0)


class SparseLinearFunction(torch.autograd.Function):
    """Y = X W^T + b for W held by ``layer`` (a SparseLinear: index buffers) with the given ``values``."""

    @staticmethod
    def forward(ctx, x, values, bias, layer, use_kernels: bool):
        # x: [B, in] (any row stride), values: [nnz], bias: [out] or None
        ctx.layer, ctx.use_kernels = layer, use_kernels
        ctx.has_bias = bias is not None
        if use_kernels and x.shape[0] > 0:
            tw = _kernels.panel_width(x.shape[0])
            xt = _kernels.pack(x, tw)                                            # [P, in, tw]
            yt = _kernels.spmm(layer.out_features, layer.indptr, layer.indices, None, values, xt)  # [P, out, tw]
            y = _kernels.unpack(yt, x.shape[0], bias)                            # [B, out]
            _kernels.release(yt)
            if not any(ctx.needs_input_grad[:3]):  # no backward will come (inference, frozen layer)
                _kernels.release(xt)
                xt = None
            ctx.save_for_backward(xt, values, None)
        else:
            y = torch_forward(x, values, layer)
            if bias is not None:
                y = y + bias
            ctx.save_for_backward(None, values, x)
        return y

    @staticmethod
    def backward(ctx, dy):
        xt, values, x = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if ctx.use_kernels and dy.shape[0] > 0:
            dyt = _kernels.pack(dy, xt.shape[2])                                 # [P, out, tw]
            if need_x:
                if layer.has_transposed_map:
                    dxt = _kernels.spmm(layer.in_features, layer.t_indptr, layer.t_indices, layer.t_perm, values, dyt)
                else:
                    dxt = _kernels.spmm_t(layer.in_features, layer.indptr, layer.indices, values, dyt)
                dx = _kernels.unpack(dxt, dy.shape[0], None)
                _kernels.release(dxt)
            if need_w:
                dw = _kernels.sddmm(layer.indptr, layer.indices, dyt, xt)
            if getattr(layer, "_want_dense_grad", False):  # RigL update step: regrowth scores from the panels
                growth.record(layer, dy, None, dyt, xt)
            _kernels.release(dyt)  # (xt stays with ctx: backward may run again with retain_graph=True)
        else:
            if need_x:
                dx = torch_input_grad(dy, values, layer)
            if need_w:
                dw = torch_weight_grad(dy, x, layer)
            if getattr(layer, "_want_dense_grad", False):
                growth.record(layer, dy, x, None, None)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, None, None
