"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): layer-wise one-shot pruning by ADMM + PCG.

The problem is SparseGPT's: given ``W0 [out, in]`` and ``H = 2 X^T X / n [in, in]``, find ``W`` of the
required sparsity minimising ``tr((W0 - W) H (W0 - W)^T)`` (= ||X (W0 - W)^T||^2 up to 2/n). ALPS
splits it as ``W = D`` with ``D`` sparse and runs ADMM (paper Algorithm 1, Sec. 3.2) with a penalty
``rho`` that grows while the support of ``D`` still moves and stops once it has settled; the weights
are then re-fitted on that support by preconditioned conjugate gradients (Algorithm 2, Sec. 3.3).
One eigendecomposition of the (dampened, unit-diagonal) H makes every ``(H + rho I)^-1`` solve two
matmuls whatever ``rho`` is. Pure functions over float32 tensors, like ``solvers``.
"""
from __future__ import annotations

import math

import torch

from ..core.patterns import Pattern, check_pattern_fits
from ..errors import SparsityError
from .solvers import dampened, mean_diagonal, row_topk_mask

__all__ = ["alps_solve", "backsolve_on_support"]

# rho schedule, after the reference implementation (github.com/mazumder-lab/ALPS): the support change
# is measured every _CHECK_EVERY iterations; above _FAST * k changed entries rho grows by _GROW[0],
# above _SLOW * k by _GROW[1], otherwise by _GROW[2] while anything changes; no change ends ADMM.
_RHO0, _RHO_MAX = 0.1, 1e6
_CHECK_EVERY = 3
_FAST, _SLOW = 0.1, 0.005
_GROW = (1.3, 1.2, 1.1)
_SHRINK = 5.0
_PCG_TOL = 1e-4
_LATE, _LATE_CHANGE = 30, 3e-4  # from iteration _LATE on, a change below _LATE_CHANGE * k counts as settled


def _keep_count(rows: int, cols: int, density: float) -> int:
    """Weights kept so that exactly round((1 - density) * numel) are pruned (sparsegpt_solve's count)."""
    return rows * cols - int(round((1.0 - density) * rows * cols))


def _project(scores: torch.Tensor, keep: int, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the projection onto the sparsity set: layer-wide top-``keep`` or N of every M per row."""
    if pattern.kind == "nm":
        return row_topk_mask(scores, 0.0, pattern)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep:
        mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def _eigh_dampened(hessian: torch.Tensor, damp: float, max_tries: int = 6
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(Hn, L, Q, s, damping used): H + damp * mean(diag H) * I = diag(s) Hn diag(s), Hn = Q diag(L) Q^T.

    Hn has a unit diagonal, so rho and the PCG preconditioner are scale-free.
    The damping rule and its tenfold retries are ``inverse_hessian_cholesky``'s; as a last resort H
    is replaced by its diagonal (L = 1, Q = I), which makes ALPS select by |W| * sqrt(diag H).
    """
    scale = mean_diagonal(hessian)
    for h, d in dampened(hessian, damp, max_tries):
        s = torch.diagonal(h).clamp_min(0).sqrt()
        if not torch.isfinite(h).all():
            break  # more damping cannot help a NaN/inf Hessian
        if not bool((s > 0).all()):
            continue
        h = h / s[:, None] / s[None, :]
        try:
            L, Q = torch.linalg.eigh(h)
        except RuntimeError:  # torch.linalg.LinAlgError: the eigensolver did not converge
            continue
        if torch.isfinite(L).all() and torch.isfinite(Q).all():
            return h, L.clamp_min(0), Q, s, d
    diag = torch.diagonal(hessian).clamp_min(0) + max(damp, 1e-2) * scale
    diag = torch.nan_to_num(diag, nan=scale, posinf=scale)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return eye.clone(), torch.ones_like(diag), eye, diag.sqrt(), float("nan")


@torch.no_grad()
def backsolve_on_support(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *,
                         iterations: int = 20, tol: float = 1e-4, init: torch.Tensor | None = None) -> torch.Tensor:
    """Re-fit ``W [out, in]`` on a fixed support: each row r solves H_SS w_S = (H w0)_S, S = keep[r].

    Preconditioned conjugate gradients (paper Algorithm 2) batched over rows, every row with its own
    support, Jacobi preconditioner diag(H)^-1; a row stops once its preconditioned residual norm has
    fallen below ``tol`` times its starting value, or after ``iterations``. Inputs with diag H <= 0
    (never nonzero) get weight 0. Starts from ``init * keep`` (default ``weight * keep``); returns
    float32 weights that are zero off the support.
    """
    W0 = weight.float().clone(memory_format=torch.contiguous_format)  # [out, in]
    H = hessian.float().clone(memory_format=torch.contiguous_format)  # [in, in]
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W0[:, dead] = 0.0
    P = keep.to(W0.dtype) * (~dead).to(W0.dtype)[None, :]  # [out, in] 1 on the support
    X = (W0 if init is None else init.float()) * P
    if iterations <= 0:
        return X
    minv = torch.diagonal(H).reciprocal()[None, :]  # [1, in] Jacobi preconditioner M^-1 = diag(H)^-1
    R = ((W0 - X) @ H) * P  # r_0 = (H w0 - H x_0)_S: the normal equations' residual on S, Alg. 2 line 1
    Z = R * minv  # z_0 = M^-1 r_0
    Pd = Z.clone()  # p_0 = z_0
    rz = (R * Z).sum(1)  # [out]
    stop = tol**2 * rz  # a row is done once r^T M^-1 r has fallen by tol^2 (its M-norm by tol)
    for _ in range(iterations):
        active = rz > stop
        if not bool(active.any()):
            break
        AP = (Pd @ H) * P  # H_SS p, Alg. 2 matvec
        pap = (Pd * AP).sum(1)
        alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(1e-30), torch.zeros_like(rz))  # step length
        X += alpha[:, None] * Pd  # x_{k+1} = x_k + alpha p_k
        R -= alpha[:, None] * AP  # r_{k+1} = r_k - alpha H p_k
        Z = R * minv
        rz_new = (R * Z).sum(1)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        Pd = Z + beta[:, None] * Pd  # p_{k+1} = z_{k+1} + beta p_k
        rz = rz_new
    return X


@torch.no_grad()
def alps_solve(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern, *,
               rho: float | None = None, iterations: int = 6, pcg_iterations: int = 4,
               damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ALPS: prune ``W [out, in]`` to ``density`` (N:M: N of every M inputs per row) and refit the kept weights.

    ``hessian`` is H = 2 X^T X / n ``[in, in]``. ``rho`` is ADMM's initial penalty relative to the
    unit-diagonal Hessian (default 0.1, the reference implementation's); ``iterations`` bounds the
    ADMM iterations (it stops earlier once the support has settled), ``pcg_iterations`` the final
    refit on the support; ``damp`` is added to H as a fraction of its mean diagonal (as SparseGPT).
    The defaults keep a 768x3072 layer within about 4x ``sparsegpt_solve``'s time on a CPU.
    Returns (new W, keep-mask, info): info has "damp" (used; NaN after the diagonal fallback),
    "iterations" (ADMM iterations run), "rho" (final), "settled" (the support stopped changing),
    "pcg_iterations" and "fallback" (True if NaN/inf forced a fallback to unrefitted weights).
    """
    if pattern.kind not in ("unstructured", "nm"):
        raise SparsityError(f"ALPS supports 'unstructured' and 'N:M' patterns, not '{pattern}'", pattern=str(pattern))
    check_pattern_fits(weight.shape, pattern)
    if rho is not None and not (math.isfinite(rho) and rho > 0):
        raise SparsityError(f"rho must be a positive number, got {rho!r}", rho=rho)
    W = weight.float().clone(memory_format=torch.contiguous_format)  # [out, in]
    H = hessian.float().clone(memory_format=torch.contiguous_format)  # [in, in]
    rows, cols = W.shape
    dead = torch.diagonal(H) <= 0  # inputs that were always zero: no information, prune them first
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W = torch.nan_to_num(W, nan=0.0, posinf=0.0, neginf=0.0)
    k = rows * cols * pattern.n // pattern.m if pattern.kind == "nm" else _keep_count(rows, cols, density)
    Hn, L, Q, s, used_damp = _eigh_dampened(H, damp)  # H + damp I = S Q L Q^T S: the one eigendecomposition
    B0 = W * s[None, :]  # W0 in the unit-diagonal coordinates (the problem of Sec. 3.1 is unchanged)

    r = _RHO0 if rho is None else float(rho)
    Bt0 = B0 @ Q  # W0 in the eigenbasis
    G = Bt0 * L[None, :]  # H W0 in the eigenbasis: the constant part of the W-update
    mask0 = _project(B0.abs(), k, pattern)  # D^0 = P(W0): the largest |W0| * sqrt(diag H)

    def restart():
        d = B0 * mask0
        return d, d @ Q, torch.zeros_like(B0), torch.zeros_like(B0)

    D, Dt, V, Vt = restart()  # D and V, and both in the eigenbasis (Dt = D Q, Vt = V Q)
    best_f = float(((Bt0 - Dt).square() * L[None, :]).sum())
    best_mask, best_D = mask0, D
    mask, checked = mask0, mask0
    started, settled, done = False, False, 0
    for t in range(iterations):
        Bt = (G + r * Dt - Vt) / (L + r)[None, :]  # W-update, Alg. 1: W = (H + rho I)^-1 (H W0 - V + rho D)
        Z = Bt @ Q.T + V / r  # W + V / rho, back in the unit-diagonal coordinates
        mask = _project(Z.abs(), k, pattern)  # D-update, Alg. 1: D = P_k(W + V / rho), top-k or N:M of |.|
        D = Z * mask
        Dt = D @ Q
        V = r * (Z - D)  # dual update, Alg. 1: V + rho (W - D), which equals rho (Z - D)
        Vt = Vt + r * (Bt - Dt)
        done = t + 1
        f = float(((Bt0 - Dt).square() * L[None, :]).sum())  # objective of the feasible iterate D: free here
        if not math.isfinite(f):
            break
        if f < best_f:  # keep the best feasible iterate: ADMM on an l0 set need not descend
            best_f, best_mask, best_D = f, mask, D
        if done % _CHECK_EVERY:
            continue
        change = int((mask != checked).sum())  # s_t = |supp D^t (sym. diff.) supp D^(t-3)|, the rho rule's input
        checked = mask
        if change > _FAST * k:  # rho-update, Alg. 1: grow rho faster the more the support still moves
            r, started = r * _GROW[0], True
        elif change > _SLOW * k:
            r, started = r * _GROW[1], True
        elif change > 0:
            if started:
                r *= _GROW[2]
            else:  # rho started too large: the support barely left W0's; restart with a smaller rho
                r /= _SHRINK
                D, Dt, V, Vt = restart()
        elif started:  # the support has settled, Alg. 1's stopping rule: ADMM's job (finding it) is done
            settled = True
            break
        else:
            r /= _SHRINK
        r = min(r, _RHO_MAX)
        if started and done >= _LATE and change < _LATE_CHANGE * k:
            settled = True
            break
    keep, start = best_mask, best_D
    fallback = not bool(torch.isfinite(start).all())
    if fallback:
        keep, start = mask0, B0 * mask0
    # PCG on the fixed support, Alg. 2 (Sec. 3.3): min tr((W0 - W) H (W0 - W)^T) s.t. supp W in S
    Bf = backsolve_on_support(B0, Hn, keep, iterations=pcg_iterations, tol=_PCG_TOL, init=start)
    new_w = Bf / s[None, :]
    new_w[~keep] = 0.0
    if not torch.isfinite(new_w).all():  # never hand back NaN: the ADMM weights, else the plain masked weights
        fallback, new_w = True, start / s[None, :]
        if not torch.isfinite(new_w).all():
            new_w = torch.nan_to_num(weight.float() * keep, nan=0.0, posinf=0.0, neginf=0.0)
    info = {"damp": used_damp, "iterations": done, "rho": r, "settled": settled,
            "pcg_iterations": pcg_iterations, "fallback": fallback}
    return new_w, keep, info
