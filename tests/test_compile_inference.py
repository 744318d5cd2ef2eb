"""Converted models under torch.compile: the packed kernels as torch.ops.sparsetorch operators (no graph break)."""
import warnings

import pytest
import torch
from torch import nn

from sparsetorch.inference import PackedLinear
from sparsetorch.kernels import has_extension
from sparsetorch.kernels.bitmask_weight import BitmaskWeight, has_int8_activations
from sparsetorch.kernels.column_bitmask import ColumnBitmaskWeight
from sparsetorch.kernels.dense_columns import DenseColumnWeight
from sparsetorch.kernels.packed import BSRWeight, CSRWeight, NMWeight

pytestmark = pytest.mark.skipif(not has_extension() or not hasattr(torch, "compile"),
                                reason="needs the compiled kernels and torch.compile")


def _weight(out, inp, seed, nm=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if nm:  # 2:4
        keep = torch.rand(out, inp // 4, 4, generator=g).argsort(-1) < 2
        return w * keep.reshape(out, inp)
    return w * (torch.rand(out, inp, generator=g) > 0.7)


def _layers():
    """One PackedLinear per kernel the operators cover (VNNI int8-activation layer where the CPU has it)."""
    specs = [("bitmask", lambda w: BitmaskWeight.from_dense(w)),
             ("bitmask", lambda w: BitmaskWeight.from_dense(w, "bf16")),
             ("bitmask", lambda w: BitmaskWeight.from_dense(w, "int8", group_size=64)),
             ("bitmask", lambda w: BitmaskWeight.from_dense(w, "int8", dense=True)),
             ("csr", CSRWeight.from_dense),
             ("nm", lambda w: NMWeight.from_dense(w, 2, 4)),
             ("bsr", lambda w: BSRWeight.from_dense(w, 4, 4)),
             ("bitmask-columns", lambda w: ColumnBitmaskWeight.from_dense(w, threshold=0.4)),
             ("bitmask-columns", lambda w: ColumnBitmaskWeight.from_dense(w, threshold=0.2, values="int8")),
             ("dense-columns", lambda w: DenseColumnWeight.from_dense(w, threshold=0.2, values="int8"))]
    if has_int8_activations():
        specs.append(("bitmask", lambda w: BitmaskWeight.from_dense(w, "int8", quantize_input=True)))
    layers = []
    for i, (kind, pack) in enumerate(specs):
        w = _weight(64, 64, i, nm=kind == "nm")
        layers.append(PackedLinear(64, 64, torch.randn(64, generator=torch.Generator().manual_seed(i)), kind, pack(w)))
    return layers


class _Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.silu(layer(x)) * 0.5
        return x


def test_fake_kernel_gives_output_shape_and_checks_the_input_width():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = BitmaskWeight.from_dense(_weight(48, 80, 0), "int8")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 80)
        y = p.op_linear(x, None)
        assert tuple(y.shape) == (5, 48) and y.dtype == torch.float32
        with pytest.raises(RuntimeError, match=r"shape \[B, 80\]"):
            p.op_linear(torch.empty(5, 81), None)
    csr = CSRWeight.from_dense(_weight(48, 80, 1))
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert tuple(csr.op_linear(torch.empty(3, 80)).shape) == (3, 48)


def test_operators_match_eager_layers_and_reject_a_wrong_width():
    x = torch.randn(3, 64)
    for layer in _layers():
        torch.testing.assert_close(layer.packed.op_linear(x, layer.bias), layer(x), rtol=0, atol=0)
    from sparsetorch.errors import SparsityError

    with pytest.raises(SparsityError, match="shape"):
        _layers()[0].packed.op_linear(torch.randn(3, 65))


@pytest.mark.slow  # inductor compiles C++: ~10 s cold on 2 busy cores
def test_fullgraph_compile_of_converted_layers_equals_eager():
    torch._dynamo.reset()
    net = _Net(_layers()).eval()
    x = torch.randn(2, 3, 64)  # 3-D input: the layers reshape around the operator
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(net, fullgraph=True)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled(x[:1]), net(x[:1]), rtol=1e-6, atol=1e-6)


def test_compile_decode_sets_up_transformers_static_cache_decode():
    """The wiring only (compiling a Llama takes minutes of wall time on a busy 2-core machine): the greedy tokens of
    the compiled decode against eager are checked by benchmarks/bench_compile_decode.py."""
    transformers = pytest.importorskip("transformers")
    from sparsetorch.inference import compile_decode

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32)
    model = compile_decode(transformers.LlamaForCausalLM(cfg).eval(), fullgraph=True)
    assert model.generation_config.cache_implementation == "static"
    config = model.generation_config.compile_config
    assert config.fullgraph and config.mode == "default" and config._compile_all_devices
    plain = compile_decode(_Net(_layers()[:1]))  # not a generate() model: torch.compile'd as a whole (lazily)
    assert isinstance(plain._orig_mod, _Net)
