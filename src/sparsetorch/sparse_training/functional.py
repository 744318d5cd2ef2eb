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

from ..kernels import training_ops
from . import growth

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


def _kernel_grads(layer, values, dyt, xt, dx: torch.Tensor | None, need_w: bool) -> torch.Tensor | None:
    """Writes dX into ``dx`` ([B, in] contiguous, or None: not wanted) and returns dW [nnz] (or None), from
    panels dyt [P, out, tw] and xt [P, in, tw] (B <= P * tw)."""
    if dx is not None:
        if layer.has_transposed_map:  # very sparse layers: gather over W's columns
            dxt = training_ops.spmm(layer.in_features, layer.t_indptr, layer.t_indices, layer.t_perm, values, dyt)
        else:                         # scatter over W's rows
            dxt = training_ops.spmm_t(layer.in_features, layer.indptr, layer.indices, values, dyt)
        training_ops.unpack(dxt, dx.shape[0], None, out=dx)
        training_ops.release(dxt)
    return training_ops.sddmm(layer.indptr, layer.indices, dyt, xt) if need_w else None


class SparseLinearFunction(torch.autograd.Function):
    """Y = X W^T + b for W held by ``layer`` (a SparseLinear: index buffers) with the given ``values``."""

    @staticmethod
    def forward(ctx, x, values, bias, layer, use_kernels: bool):
        # x: [B, in] (any row stride), values: [nnz], bias: [out] or None
        ctx.layer, ctx.use_kernels = layer, use_kernels
        ctx.has_bias = bias is not None
        if use_kernels and x.shape[0] > 0:
            tw = training_ops.panel_width(x.shape[0])
            xt = training_ops.pack(x, tw)                                            # [P, in, tw]
            yt = training_ops.spmm(layer.out_features, layer.indptr, layer.indices, None, values, xt)  # [P, out, tw]
            y = training_ops.unpack(yt, x.shape[0], bias)                            # [B, out]
            training_ops.release(yt)
            if not any(ctx.needs_input_grad[:3]):  # no backward will come (inference, frozen layer)
                training_ops.release(xt)
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
            tw = xt.shape[2]
            dx = dy.new_empty(dy.shape[0], layer.in_features) if need_x else None
            if getattr(layer, "_want_dense_grad", False):  # RigL update step: regrowth scores from all panels
                dyt = training_ops.pack(dy, tw)                                      # [P, out, tw]
                dw = _kernel_grads(layer, values, dyt, xt, dx, need_w)
                growth.record(layer, dy, None, dyt, xt)
                training_ops.release(dyt)  # (xt stays with ctx: backward may run again with retain_graph=True)
            else:  # one panel of dY at a time: its packed copy is [out, tw], not the whole batch
                for p in range(xt.shape[0]):
                    rows = slice(p * tw, (p + 1) * tw)
                    dyt = training_ops.pack(dy[rows], tw)                            # [1, out, tw]
                    dw_p = _kernel_grads(layer, values, dyt, xt[p:p + 1], None if dx is None else dx[rows], need_w)
                    dw = dw_p if dw is None else dw.add_(dw_p)
                    training_ops.release(dyt)
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
