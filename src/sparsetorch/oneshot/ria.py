"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance and activations, and the
channel permutation that makes N:M masks keep more of it.

Pure functions over a weight ``W [out, in]`` (float32) and ``x_sq_norm [in]``, the per-input sum of
squares over the calibration tokens (the statistic Wanda uses). Masks are bool keep-masks.

A permuted N:M mask is returned in the weight's ORIGINAL column order: it is N:M on
``mask[:, perm]``, not on ``mask`` itself. The weights are never moved; ``perm`` is recorded on
the module (``core.masks.set_input_order``) and checked with ``is_valid_mask(..., input_order=perm)``.
"""
from __future__ import annotations

import torch

from ..core.patterns import Pattern, parse_pattern
from ..errors import SparsityError
from .solvers import layer_topk_mask, row_topk_mask

__all__ = ["ria_scores", "nm_kept_score", "nm_channel_permutation", "ria_mask"]


def ria_scores(weight: torch.Tensor, x_sq_norm: torch.Tensor, *, a: float = 0.5) -> torch.Tensor:
    """RIA_ij = (|W_ij| / sum_j |W_ij| + |W_ij| / sum_i |W_ij|) * (||X_j||_2)^a, shape ``[out, in]``.

    ``||X_j||_2 = sqrt(x_sq_norm_j)``, so the activation factor is ``x_sq_norm ** (a / 2)``; the
    paper's and the reference's default ``a = 0.5`` (``a = 0``: relative importance alone). The
    first term normalises over the row (the output's inputs), the second over the column (the
    input's outputs). An all-zero row or column contributes 0, not NaN.
    """
    if weight.dim() != 2:
        raise SparsityError(f"ria_scores needs a 2-D weight [out, in], got shape {tuple(weight.shape)}",
                            shape=tuple(weight.shape))
    if x_sq_norm.shape != (weight.shape[1],):
        raise SparsityError(
            f"x_sq_norm has shape {tuple(x_sq_norm.shape)}, expected ({weight.shape[1]},): one sum of "
            "squares per input of the weight", shape=tuple(x_sq_norm.shape), inputs=weight.shape[1],
        )
    w = weight.float().abs()  # [out, in]
    tiny = torch.finfo(torch.float32).tiny
    row_sum = w.sum(dim=1, keepdim=True).clamp_min(tiny)  # [out, 1]: sum over j
    col_sum = w.sum(dim=0, keepdim=True).clamp_min(tiny)  # [1, in]: sum over i
    act = x_sq_norm.float().clamp_min(0).pow(a / 2.0)  # [in] = ||X_j||_2 ** a
    return (w / row_sum + w / col_sum) * act[None, :]


def nm_kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score an N:M mask keeps on ``scores [out, in]`` in its current column order (float64)."""
    rows, cols = scores.shape
    groups = scores.double().reshape(rows, cols // m, m)
    return float(torch.topk(groups, n, dim=-1).values.sum())


def _deal_out(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The paper's heuristic reallocation: sort channels by total score (descending) and deal them
    out so that group g gets one channel of each 1/m quantile, snaking (g, then G-1-g, ...) so the
    strong and weak ends balance. Returns the permutation ``[in]``."""
    cols = scores.shape[1]
    groups = cols // m
    order = torch.argsort(scores.double().sum(dim=0), descending=True, stable=True)  # [in]
    g = torch.arange(groups)
    perm = torch.empty(cols, dtype=torch.long)
    for k in range(m):
        src = k * groups + (g if k % 2 == 0 else groups - 1 - g)  # quantile k, snaking
        perm[g * m + k] = order[src]
    return perm


def _lsa_position(s: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """One linear-sum-assignment step on the permuted scores ``s [out, G*m]``: reassign the channels
    at slot ``k`` of every group among the groups, the other slots fixed, to maximise the kept total.

    Returns ``src [G]``: group g takes the slot-k channel of group ``src[g]``. With the m-1 fixed
    values of group g sorted as f_1 >= ... >= f_{m-1}, a row keeps sum(f_1..f_{n-1}) + max(v, f_n)
    when value v joins, and max(v, t) = (v + t + |v - t|) / 2; so, up to terms constant along a row
    or a column of the assignment matrix (which no assignment can change), the gain of putting
    candidate r into group g is the L1 distance between column v_r and column t_g over the outputs.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("RIA's channel permutation (permute=True) needs scipy: pip install "
                          "'sparsetorch[oneshot]'") from None

    rows, cols = s.shape
    groups = cols // m
    grouped = s.reshape(rows, groups, m)
    v = grouped[:, :, k]  # [out, G]: the candidates
    others = torch.cat([grouped[:, :, :k], grouped[:, :, k + 1:]], dim=2)  # [out, G, m-1]
    t = torch.topk(others, n, dim=2).values[:, :, n - 1]  # [out, G]: f_n of each group
    gain = torch.cdist(t.T.double().contiguous(), v.T.double().contiguous(), p=1)  # [G target, G cand]
    _, src = linear_sum_assignment(gain.numpy(), maximize=True)
    return torch.from_numpy(src).long()


def nm_channel_permutation(scores: torch.Tensor, m: int, *, n: int | None = None, rounds: int = 1,
                           block_groups: int | None = None) -> torch.Tensor:
    """RIA's channel permutation for N:M: ``perm [in]`` (int64) such that the N:M mask chosen on
    ``scores[:, perm]`` keeps as much total score as it can.

    Channels are first dealt out by total score (``_deal_out``: large-score channels land in
    different M-groups), then each round refines every slot 0..m-1 in turn with a linear-sum
    assignment of that slot's channels to the groups (each step never lowers the kept total).
    ``n`` defaults to ``m // 2`` (2:4, 4:8). ``block_groups`` limits each assignment to blocks of
    that many consecutive groups (the reference's "fast" mode; None: all groups at once, a
    ``G x G`` problem with ``G = in / m``). The result is never worse than the identity: if the
    permuted mask does not keep strictly more score, ``arange(in)`` is returned.
    """
    if scores.dim() != 2:
        raise SparsityError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}", shape=tuple(scores.shape))
    n = m // 2 if n is None else n
    cols = scores.shape[1]
    if not 0 < n < m or cols % m:
        raise SparsityError(f"need 0 < N < M and M dividing the {cols} inputs, got N={n}, M={m}",
                            n=n, m=m, inputs=cols)
    s = scores.detach().float().cpu()
    identity = torch.arange(cols, dtype=torch.long)
    base = nm_kept_score(s, n, m)
    perm = _deal_out(s, m)
    groups = cols // m
    span = groups if block_groups is None else max(1, int(block_groups))
    for _ in range(max(0, int(rounds))):
        before = nm_kept_score(s[:, perm], n, m)
        for k in range(m):
            for g0 in range(0, groups, span):
                g1 = min(groups, g0 + span)
                block = perm[g0 * m:g1 * m]
                src = _lsa_position(s[:, block], n, m, k)
                slots = torch.arange(g1 - g0) * m + k
                new_block = block.clone()
                new_block[slots] = block[src * m + k]
                perm[g0 * m:g1 * m] = new_block
        if nm_kept_score(s[:, perm], n, m) <= before * (1 + 1e-12):
            break  # converged
    after = nm_kept_score(s[:, perm], n, m)
    if not after > base * (1 + 1e-12):  # also rejects NaN
        return identity
    return perm


def ria_mask(weight: torch.Tensor, x_sq_norm: torch.Tensor, density: float, pattern: Pattern | str, *,
             a: float = 0.5, permute: bool = False, scope: str = "row") -> tuple[torch.Tensor, torch.Tensor | None]:
    """RIA keep-mask of ``weight [out, in]`` and the input permutation it was chosen in (or None).

    Unstructured: the ``density`` fraction of highest RIA scores of each row (``scope="row"``) or
    of the whole layer (``scope="layer"``, the reference code's default: relative importance is
    normalised, so it compares across rows). N:M: the N highest of each M group; with
    ``permute=True`` the groups are taken in ``nm_channel_permutation`` order and the mask is
    returned in the original column order together with ``perm`` (N:M holds on ``keep[:, perm]``;
    ``perm`` is None when not permuting or when the permutation would not help).
    """
    pattern = parse_pattern(pattern)
    if pattern.kind not in ("unstructured", "nm"):
        raise SparsityError(f"RIA supports 'unstructured' and 'N:M' patterns, not '{pattern}'", pattern=str(pattern))
    if scope not in ("row", "layer"):
        raise SparsityError(f"scope must be 'row' or 'layer', got {scope!r}", scope=scope)
    scores = ria_scores(weight, x_sq_norm, a=a)
    if pattern.kind == "unstructured":
        keep = row_topk_mask(scores, density, pattern) if scope == "row" else layer_topk_mask(scores, density)
        return keep, None
    if weight.shape[1] % pattern.m:
        raise SparsityError(f"{weight.shape[1]} inputs are not divisible by M={pattern.m} of pattern '{pattern}'",
                            inputs=weight.shape[1], pattern=str(pattern))
    if not permute:
        return row_topk_mask(scores, density, pattern), None
    perm = nm_channel_permutation(scores, pattern.m, n=pattern.n).to(scores.device)
    if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        return row_topk_mask(scores, density, pattern), None
    keep_permuted = row_topk_mask(scores[:, perm], density, pattern)  # N:M in permuted order
    keep = torch.empty_like(keep_permuted)
    keep[:, perm] = keep_permuted  # back to the original column order
    return keep, perm
