"""``sparsetorch.export_onnx``: an ONNX file whose sparse weights are stored sparse.

The graph comes from ``torch.onnx.export`` (the TorchScript exporter: it needs no extra
packages). Then every float initializer that is smaller as a ``SparseTensorProto`` moves to
``graph.sparse_initializer``: values plus INT64 linear indices, as the ONNX spec requires.
onnxruntime accepts sparse initializers and densifies them when it loads the model, so the file
is small and inference runs as usual. With 8-byte indices a float32 tensor is smaller sparse
only below about 1/3 density (float16: 1/5); denser tensors stay dense.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SparsityError
from ..formats.atomic import atomic_write

__all__ = ["export_onnx", "sparsify_initializers"]

_INDEX_BYTES = 8  # ONNX sparse tensor indices are INT64


def export_onnx(
    model: nn.Module,
    example_inputs: object,
    path: str | os.PathLike,
    *,
    sparse: str = "auto",
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = False,
    check: bool = True,
) -> Path:
    """Export ``model`` (run on ``example_inputs``) to ``path`` and return the path.

    sparse: "auto" stores each weight sparse when that makes it smaller; "off" keeps all dense.
    dynamic_batch: the first dimension of every input and output may vary.
    dynamic_sequence: the second dimension of every input and output may vary too (token sequences; export a
        transformers decoder through :class:`~sparsetorch.export.DecoderLogits`).
    check: validate the file with ``onnx.checker`` and run it in onnxruntime (when installed),
        raising if its outputs differ from the model's; with ``dynamic_sequence`` also on the inputs cut one
        position shorter, so that a length the tracer baked in fails here rather than in deployment.

    Needs the ``onnx`` extra (``pip install sparsetorch[onnx]``).
    """
    try:
        import onnx
    except ImportError:
        raise SparsityError("export_onnx needs the onnx package: pip install 'sparsetorch[onnx]'") from None
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    if sparse not in ("auto", "off"):
        raise SparsityError(f"sparse must be 'auto' or 'off', got {sparse!r}", sparse=sparse)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise SparsityError("example_inputs must be a tensor or a tuple of tensors the model accepts")
    if dynamic_sequence and not all(a.dim() >= 2 for a in args):
        raise SparsityError("dynamic_sequence makes dimension 1 of every input vary, but an example input has fewer "
                            "than 2 dimensions; pass [batch, sequence, ...] inputs or dynamic_sequence=False")
    shorter = tuple(a[:, :-1] for a in args) if dynamic_sequence and all(a.shape[1] > 1 for a in args) else None
    flags = {m: m.training for m in model.modules()}  # restored one by one: eval submodules of a training model stay
    model.eval()
    try:
        with torch.no_grad():
            try:
                expected = model(*args)
            except Exception as exc:
                raise SparsityError(f"the model failed on example_inputs ({type(exc).__name__}: {exc}); pass inputs "
                                    "shaped like real ones") from None
            outputs = _flatten(expected)
            proto = _export(model, args, len(outputs), opset, dynamic_batch, dynamic_sequence)
            expected_shorter = _flatten(model(*shorter)) if check and shorter is not None else None
    finally:
        for m, flag in flags.items():
            m.training = flag
    if sparse == "auto":
        sparsify_initializers(proto)
    payload = proto.SerializeToString()
    if check:
        onnx.checker.check_model(proto)
        _check_runtime(payload, args, outputs)
        if expected_shorter is not None:
            try:
                _check_runtime(payload, shorter, expected_shorter)
            except Exception as exc:
                raise SparsityError(
                    f"the exported graph is wrong for a sequence one shorter than the example ({type(exc).__name__}): "
                    "tracing fixed the length somewhere in the model's forward. Export with dynamic_sequence=False "
                    "(one length only), or wrap a transformers decoder in sparsetorch.export.DecoderLogits") from None
    return atomic_write(Path(path), payload)


def _flatten(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _export(model, args, n_out, opset, dynamic_batch, dynamic_sequence=False):
    import onnx

    inputs = [f"input_{i}" for i in range(len(args))]
    outputs = [f"output_{i}" for i in range(n_out)]
    dims = ({0: "batch"} if dynamic_batch else {}) | ({1: "sequence"} if dynamic_sequence else {})
    axes = {n: dict(dims) for n in inputs + outputs} if dims else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(model, args, buffer, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SparsityError(
            f"torch.onnx.export cannot export {type(model).__name__}: {first}. Replace or remove that operator, "
            "or try another opset (opset=...)",
            model=type(model).__name__,
        ) from None
    return onnx.load_from_string(buffer.getvalue())


def sparsify_initializers(proto, min_size: int = 64) -> int:
    """Move float initializers that are smaller sparse into ``graph.sparse_initializer``; returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph, moved, keep = proto.graph, 0, []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or array.size < min_size:
            keep.append(init)
            continue
        flat = array.reshape(-1)
        nz = np.flatnonzero(flat)
        if nz.size * (array.itemsize + _INDEX_BYTES) >= array.size * array.itemsize:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), f"{init.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def _check_runtime(payload: bytes, args: tuple, expected: list[torch.Tensor]) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    got = session.run(None, feeds)
    for i, (e, g) in enumerate(zip(expected, got)):
        e = e.detach().float().cpu()
        g = torch.from_numpy(g).float()
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        if e.shape != g.shape or not torch.allclose(e, g, rtol=1e-3, atol=1e-4 * scale):
            raise RuntimeError(f"the exported ONNX model's output {i} differs from the PyTorch model's; "
                               "this is a sparsetorch bug, please report it")
