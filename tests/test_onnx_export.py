"""sparsetorch.export_onnx: shrunk and sparse models run in onnxruntime with the same outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import sparsetorch  # noqa: E402
from sparsetorch import SparsityError  # noqa: E402
from sparsetorch.models import MLP, ResNet  # noqa: E402
from sparsetorch.shrink import prune_channels, shrink  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def test_sparse_mlp_file_is_small_and_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = MLP((64, 256, 256, 10))
    sparsetorch.prune(model, 0.9, scope="layer")
    x = torch.randn(4, 64)
    sparse_path = sparsetorch.export_onnx(model, x, tmp_path / "sparse.onnx")
    dense_path = sparsetorch.export_onnx(model, x, tmp_path / "dense.onnx", sparse="off")
    proto = onnx.load(str(sparse_path))
    assert {s.values.name for s in proto.graph.sparse_initializer} >= {"fc1.weight", "fc2.weight"}
    assert sparse_path.stat().st_size < 0.35 * dense_path.stat().st_size
    # other batch sizes run too (dynamic batch)
    x8 = torch.randn(8, 64)
    np.testing.assert_allclose(run_onnx(sparse_path, x8)[0], model(x8).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_dense_weights_stay_dense():
    from sparsetorch.export.onnx import sparsify_initializers
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 16), dtype=np.float32), "w")  # dense: sparse would be larger
    graph = helper.make_graph([], "g", [], [], initializer=[w])
    proto = helper.make_model(graph)
    assert sparsify_initializers(proto) == 0 and len(proto.graph.initializer) == 1


def test_shrunk_resnet_exports_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = ResNet(widths=(8, 16), blocks=1).eval()
    x = torch.randn(2, 3, 16, 16)
    prune_channels(model, 0.5, example_inputs=x)
    small = shrink(model, x)
    path = sparsetorch.export_onnx(small, x, tmp_path / "small.onnx")
    np.testing.assert_allclose(run_onnx(path, x)[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class Unexportable(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(SparsityError, match="svd"):
        sparsetorch.export_onnx(Unexportable(), torch.randn(3, 3), tmp_path / "x.onnx")
    with pytest.raises(SparsityError, match="failed on example_inputs"):
        sparsetorch.export_onnx(MLP((8, 4)), torch.randn(2, 5), tmp_path / "x.onnx")
    with pytest.raises(SparsityError, match="sparse must be"):
        sparsetorch.export_onnx(MLP((8, 4)), torch.randn(2, 8), tmp_path / "x.onnx", sparse="yes")
    with pytest.raises(SparsityError, match="tuple of tensors"):
        sparsetorch.export_onnx(MLP((8, 4)), [1, 2], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
