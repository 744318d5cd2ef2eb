"""Matplotlib figures of the explain analyses (optional extra ``sparsetorch[plot]``).

Every function takes plain data (tensors, dicts, rows) and returns a ``matplotlib.figure.Figure``
so callers decide whether to show, save or embed it. The Agg backend is used: no display needed.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import torch

from ..errors import SparsityError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'sparsetorch[plot]'") from None
    return plt


def sparsity_bars(names: Sequence[str], sparsities: Sequence[float]):
    """Horizontal bars of per-layer sparsity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
    ax.barh(range(len(names)), [100 * s for s in sparsities], color="#3b7dd8")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    for i, s in enumerate(sparsities):
        ax.text(min(100 * s + 1, 88), i, f"{s:.1%}", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def mask_heatmaps(masks: dict[str, torch.Tensor], max_side: int = 256):
    """One panel per layer: kept connections (dark) of the [out, in] view, pooled to at most ``max_side``."""
    plt = _plt()
    n = len(masks)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, mask) in zip(axes.flat, masks.items()):
        m2 = mask.reshape(mask.shape[0], -1).float()
        pool = (max(1, math.ceil(m2.shape[0] / max_side)), max(1, math.ceil(m2.shape[1] / max_side)))
        img = torch.nn.functional.avg_pool2d(m2[None, None], pool, ceil_mode=True)[0, 0] if pool != (1, 1) else m2
        ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}  {1 - mask.float().mean().item():.1%} sparse", fontsize=9)
        ax.set_xlabel("input")
        ax.set_ylabel("output")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def fan_in_histograms(fan_ins: dict[str, torch.Tensor]):
    """Histogram of kept inputs per output unit, per layer."""
    plt = _plt()
    n = len(fan_ins)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, (name, fan) in zip(axes.flat, fan_ins.items()):
        ax.hist(fan.numpy(), bins=min(30, int(fan.max()) + 1 if fan.numel() else 1), color="#d8833b")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fan-in")
    axes.flat[0].set_ylabel("units")
    fig.tight_layout()
    return fig


def importance_map(importance: torch.Tensor, image_shape: tuple[int, int] | None = None, title: str = ""):
    """Feature importance as an image (e.g. 8x8 digits) or, without a shape, as bars."""
    plt = _plt()
    imp = importance.detach().float().cpu()
    side = int(math.isqrt(imp.numel()))
    shape = image_shape or ((side, side) if side * side == imp.numel() and imp.dim() <= 1 else None)
    if imp.dim() >= 2 and shape is None:
        shape = tuple(imp.shape[-2:])
        imp = imp.reshape(-1, *shape).sum(0)
    if shape is not None:
        fig, ax = plt.subplots(figsize=(3.4, 3.2))
        im = ax.imshow(imp.reshape(shape).numpy(), cmap="magma")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        fig, ax = plt.subplots(figsize=(7, 2.6))
        ax.bar(range(imp.numel()), imp.numpy(), color="#7a3bd8")
        ax.set_xlabel("input feature")
    ax.set_title(textwrap.fill(title, 38), fontsize=8)
    fig.tight_layout()
    return fig


def connection_graph(weights: Sequence[torch.Tensor], max_units: int = 40):
    """Drawing of a small MLP's kept connections: layers as columns, line width by |w|."""
    plt = _plt()
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    if max(sizes) > max_units:
        raise SparsityError(f"graph drawing is for small MLPs (<= {max_units} units per layer); got {sizes}: "
                            "raise max_units or plot a heatmap (explain.plots.mask_heatmap) instead")
    fig, ax = plt.subplots(figsize=(1.8 * len(sizes) + 1, 4))
    pos = [[(x, (i + 0.5) / n) for i in range(n)] for x, n in enumerate(sizes)]
    top = max(float(w.abs().max()) for w in weights) or 1.0
    for layer, w in enumerate(weights):
        rows, cols = torch.nonzero(w, as_tuple=True)
        for j, i in zip(rows.tolist(), cols.tolist()):
            (x0, y0), (x1, y1) = pos[layer][i], pos[layer + 1][j]
            v = float(w[j, i])
            ax.plot([x0, x1], [y0, y1], color="#c0392b" if v < 0 else "#2471a3", lw=0.3 + 2.5 * abs(v) / top, alpha=0.7)
    for column in pos:
        ax.scatter(*zip(*column), s=18, color="black", zorder=3)
    ax.axis("off")
    ax.set_title("kept connections (blue +, red -, width ~ |w|)", fontsize=9)
    fig.tight_layout()
    return fig


def accuracy_curves(results: dict[str, dict[float, tuple[float, float]]], title: str = "accuracy vs sparsity"):
    """``{method: {sparsity: (mean, spread)}}`` -> lines with error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, points in results.items():
        xs = sorted(points)
        ax.errorbar([100 * x for x in xs], [100 * points[x][0] for x in xs], yerr=[100 * points[x][1] for x in xs],
                    marker="o", capsize=3, label=method)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mask_dynamics(history: Sequence[dict]):
    """Connections moved per mask update over training (from a sparsifier's history)."""
    plt = _plt()
    rows = [r for r in history if "moved" in r]
    fig, ax = plt.subplots(figsize=(5.5, 3))
    ax.plot([r["step"] for r in rows], [r["moved"] for r in rows], marker=".", color="#16a085")
    ax.set_xlabel("step")
    ax.set_ylabel("connections moved")
    ax.set_title("mask dynamics", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """Render and close a figure; PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()
