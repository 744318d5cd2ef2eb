"""One self-contained HTML page (images embedded, no scripts, no network) explaining a sparse model."""
from __future__ import annotations

import base64
import datetime
import html
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..core.masks import get_mask
from .layer_report import report
from ..core.layer_selection import DEFAULT_TYPES
from . import plots
from .connectivity import connectivity, dead_units
from .cost import cost_estimate
from .importance import critical_connections, feature_importance

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left} tr.total td{font-weight:600;border-top:2px solid #999}
.cards{display:flex;gap:1em;flex-wrap:wrap} .card{background:#f5f7fa;border-radius:8px;padding:.7em 1.2em}
.card b{display:block;font-size:1.5em} .muted{color:#777;font-size:12px} img{max-width:100%}
"""


def _img(fig) -> str:
    data = base64.b64encode(plots.to_png(fig)).decode()
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], total: Sequence[object] | None = None) -> str:
    esc = lambda v: html.escape(str(v))
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    if total is not None:
        out.append('<tr class="total">' + "".join(f"<td>{esc(c)}</td>" for c in total) + "</tr>")
    return "".join(out) + "</table>"


def _is_linear_chain(model: nn.Module) -> bool:
    return all(isinstance(m, nn.Linear) for m in model.modules() if isinstance(m, DEFAULT_TYPES))


def build_report(
    model: nn.Module,
    *,
    example_inputs: torch.Tensor | None = None,
    data: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    image_shape: tuple[int, int] | None = None,
    history: Sequence[dict] | None = None,
    curves: dict | None = None,
    file_path: str | os.PathLike | None = None,
    title: str = "sparsetorch report",
) -> str:
    """The HTML text of the report. Sections are left out when their inputs are missing."""
    sections: list[str] = []
    rep = report(model, example_inputs)
    tot = rep.total
    cards = [("sparsity", f"{rep.sparsity:.1%}"), ("weights kept", f"{tot.nonzeros:,} / {tot.params:,}"),
             ("weight bytes", f"{tot.sparse_bytes / 1024:.0f} KB sparse vs {tot.dense_bytes / 1024:.0f} KB dense")]
    if file_path is not None:
        cards.append(("file on disk", f"{os.path.getsize(file_path) / 1024:.0f} KB"))
    sections.append('<div class="cards">' + "".join(f'<div class="card"><b>{html.escape(v)}</b>{html.escape(k)}</div>'
                                                    for k, v in cards) + "</div>")
    fmt = lambda r: [r.name, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.nonzeros:,}", f"{r.sparsity:.1%}",
                     "-" if r.sparse_flops is None else f"{r.sparse_flops / 1e6:.3f}",
                     f"{r.dense_bytes / 1024:.1f}", f"{r.sparse_bytes / 1024:.1f}"]
    sections.append("<h2>Layers</h2>" + _table(
        ["layer", "shape", "params", "kept", "sparsity", "MFLOPs/sample", "KB dense", "KB sparse"],
        [fmt(r) for r in rep.rows], fmt(tot)))
    sections.append(_img(plots.sparsity_bars([r.name for r in rep.rows], [r.sparsity for r in rep.rows])))

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DEFAULT_TYPES)]
    masks = {n: (get_mask(m) if get_mask(m) is not None else m.weight.detach() != 0) for n, m in layers}
    sections.append("<h2>Which connections survive</h2>" + _img(plots.mask_heatmaps(masks)))
    conn = connectivity(model)
    sections.append(_img(plots.fan_in_histograms({c.name: c.fan_in for c in conn})))
    dead = dead_units(model)
    sections.append(_table(["layer", "outputs with no input", "outputs nobody reads", "mean fan-in", "mean fan-out"],
                           [[c.name, len(dead[c.name]["no_input"]), len(dead[c.name]["no_output"]),
                             f"{c.fan_in.float().mean():.1f}", f"{c.fan_out.float().mean():.1f}"] for c in conn]))

    sections.append("<h2>Which input features matter</h2>")
    shape = tuple(example_inputs.shape[1:]) if example_inputs is not None else None
    if shape is not None or _is_linear_chain(model):
        for method, label in (("connectivity", "first-layer connectivity (sum of kept |W| per input)"),
                              ("paths", "path importance (sum over kept paths of the product of |w|)")):
            imp = feature_importance(model, method, input_shape=shape)
            sections.append(_img(plots.importance_map(imp, image_shape, label)))
    if data is not None:
        imp = feature_importance(model, "grad_x_input", data=data, targets=targets)
        sections.append(_img(plots.importance_map(imp, image_shape, "gradient x input on data (data-driven)")))
    if shape is not None or _is_linear_chain(model):
        crit = critical_connections(model, 10, input_shape=shape)
        sections.append("<p>Connections carrying the most path flow:</p>" + _table(
            ["layer", "(out, in, ...)", "weight", "path flow"],
            [[c["layer"], c["index"], f"{c['weight']:+.4f}", f"{c['flow']:.3g}"] for c in crit]))
    small = [m.weight.detach() * masks[n] for n, m in layers]
    if _is_linear_chain(model) and max(max(w.shape) for w in small) <= 40:
        sections.append(_img(plots.connection_graph(small)))

    if history:
        sections.append("<h2>Mask dynamics during training</h2>" + _img(plots.mask_dynamics(history)))
    if curves:
        sections.append("<h2>Accuracy vs sparsity</h2>" + _img(plots.accuracy_curves(curves)))
    if example_inputs is not None:
        est = cost_estimate(model, example_inputs[:1])
        sections.append("<h2>Cost per inference (estimate)</h2>" + _table(
            ["", "dense", "sparse", "ratio"],
            [["multiply-accumulates", f"{est.dense_macs:,}", f"{est.sparse_macs:,}",
              f"{est.dense_macs / max(est.sparse_macs, 1):.1f}x"],
             ["weight bytes moved", f"{est.dense_weight_bytes:,}", f"{est.sparse_weight_bytes:,}",
              f"{est.dense_weight_bytes / max(est.sparse_weight_bytes, 1):.1f}x"],
             ["energy (uJ, estimate)", f"{est.dense_energy_uj:.3f}", f"{est.sparse_energy_uj:.3f}",
              f"{est.energy_ratio:.1f}x"]]) + f'<p class="muted">{html.escape(est.note)}. Source: {html.escape(est.source)}.</p>')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="muted">generated by sparsetorch on {stamp}</p>{"".join(sections)}</body></html>')


def write_report(path: str | os.PathLike, model: nn.Module, **kwargs) -> str:
    """Write ``build_report`` to ``path`` atomically; returns the path."""
    from ..formats.atomic import atomic_write
    from pathlib import Path

    atomic_write(Path(path), build_report(model, **kwargs).encode())
    return str(path)
