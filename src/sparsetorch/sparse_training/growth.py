"""RigL's regrowth scores, formed in the backward pass of an armed SparseLinear (update steps only).

RigL grows the k inactive positions with the largest |dL/dW| (Evci et al. 2020). Keeping the whole dense
gradient of every layer until the update would cost as much memory as the dense weights, so by default an
armed layer (``layer._grow_k = k``) forms dL/dW = dY^T X a block of rows at a time and keeps only

* ``grow_candidates``: the k best inactive positions and their |g| (2k numbers), and
* ``active_grad``: |g| at the kept positions [nnz], since a weight dropped at the update may be grown back.

The k best among (inactive after the drop) are then exactly the k best of these candidates plus the dropped
positions. With ``layer._grow_k = None`` the dense gradient is kept and summed over backward passes
(``dense_grad``): needed for gradient accumulation and for averaging across DDP ranks.
"""
from __future__ import annotations

import torch

from ..errors import SparsityError

# at most this many elements of a layer's dense gradient exist at once (4 MB in float32)
_CHUNK_ELEMENTS = 1 << 20


def dense_grad_rows(r0: int, r1: int, dy, x, dyt, xt) -> torch.Tensor:
    """dL/dW[r0:r1, :] = dY[:, r0:r1]^T X, [r1 - r0, in]; from panels (dyt [P, out, tw], xt [P, in, tw],
    whose batch padding is zero) when given, else from dy [B, out] and x [B, in]."""
    if dyt is None:
        return dy[:, r0:r1].t() @ x
    g = dyt[0, r0:r1] @ xt[0].t()
    for p in range(1, dyt.shape[0]):
        g.addmm_(dyt[p, r0:r1], xt[p].t())
    return g


@torch.no_grad()
def record(layer, dy, x, dyt, xt) -> None:
    """Store what the next RigL update of ``layer`` needs (see the module docstring)."""
    out, inp, k = layer.out_features, layer.in_features, layer._grow_k
    if k is None:
        g = dense_grad_rows(0, out, dy, x, dyt, xt)                       # [out, in]
        prev = getattr(layer, "dense_grad", None)
        layer.dense_grad = g if prev is None else prev + g  # gradient accumulation: sum the micro-batches
        return
    if getattr(layer, "grow_candidates", None) is not None:
        raise SparsityError("a second backward pass before a RigL update step: with gradient accumulation create "
                            "CompressedRigL(..., grad_accumulation=n) so the dense gradient is summed over them")
    rows = torch.repeat_interleave(torch.arange(out), layer.indptr.diff().cpu())    # row of each nonzero
    cols = layer.indices.to(torch.int64)
    indptr = layer.indptr.tolist()
    active = torch.empty(layer.nnz, dtype=dy.dtype)
    pos_dtype = torch.int32 if out * inp <= torch.iinfo(torch.int32).max else torch.int64  # k positions kept
    best_pos, best_score = torch.zeros(0, dtype=pos_dtype), torch.zeros(0, dtype=dy.dtype)
    step = max(1, _CHUNK_ELEMENTS // inp)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        g = dense_grad_rows(r0, r1, dy, x, dyt, xt).abs_().view(-1)     # [(r1 - r0) * in]
        a, b = indptr[r0], indptr[r1]
        at = (rows[a:b] - r0) * inp + cols[a:b]
        active[a:b] = g[at]
        g[at] = -1.0  # kept positions are scored by ``active``; |g| >= 0 elsewhere
        score, pos = torch.topk(g, min(k, g.numel()), sorted=False)
        best_score, best_pos = torch.cat([best_score, score]), torch.cat([best_pos, (pos + r0 * inp).to(pos_dtype)])
        if best_score.numel() > k:
            best_score, keep = torch.topk(best_score, k, sorted=False)
            best_pos = best_pos[keep]
    layer.grow_candidates, layer.active_grad = (best_pos, best_score), active


def best_grown(layer, k: int, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The k positions not in ``kept`` (sorted flat, after the drop) with the largest recorded |g|;
    ``dropped``: storage slots (in the connectivity the scores were recorded with) of the dropped weights."""
    if getattr(layer, "dense_grad", None) is not None:
        score = layer.dense_grad.abs().flatten()                          # [out * in], this step only
        score[kept] = -1.0
        return torch.topk(score, k, sorted=False).indices
    pos, score = layer.grow_candidates
    pos = torch.cat([pos.to(torch.int64), layer.flat_positions()[dropped]])
    score = torch.cat([score, layer.active_grad[dropped]])
    valid = score >= 0  # the -1 placeholders of kept positions, if any
    pos, score = pos[valid], score[valid]
    return pos[torch.topk(score, k, sorted=False).indices]


def clear(layer) -> None:
    layer.dense_grad = layer.grow_candidates = layer.active_grad = None


def has_record(layer) -> bool:
    return getattr(layer, "dense_grad", None) is not None or getattr(layer, "grow_candidates", None) is not None
