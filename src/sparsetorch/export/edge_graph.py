"""torch.fx graph -> the edge runtime's node list (see sparsetorch/edge/model.py for the format).

Every fx node maps to one edge node, to an alias of its input (dropout, identity, contiguous), or to a
SparsityError naming the op and the module that uses it, so unsupported models fail here, at export,
not on the device. BatchNorm after a conv/linear is folded into its weight and bias.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import SparsityError
from ..core.masks import get_mask
from ..tracing.activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES

_BINARY_FUNCS = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
                 operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}
_BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
_ALIAS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_ALIAS_FUNCS = {F.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d}

SUPPORTED = ("Linear, Conv1d, Conv2d, BatchNorm1d/2d, MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool to 1, ReLU, GELU, "
             "SiLU, Tanh, Sigmoid, Softmax, LayerNorm, Flatten, Dropout, Identity, +, -, *, /, reshape/view, "
             "flatten, cat, permute, transpose, size, sparsetorch's GPT, transformers LlamaForCausalLM (exported whole)")


class Graph:
    """The edge description being built: nodes, float32 matrices still to encode, raw arrays."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.matrices: dict[str, np.ndarray] = {}  # name -> [out, in*k] float32, encoded at the end
        self.raw: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}

    def add_raw(self, name: str, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        self.raw[name] = t.detach().to("cpu", torch.float32).numpy().copy()
        return name


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def dense_weight(module: nn.Module) -> torch.Tensor:
    mask = get_mask(module, "weight")
    w = module.weight.detach()
    return w if mask is None else w * mask.to(w.device)


def _unsupported(what: str, node: fx.Node, hint: str = "") -> SparsityError:
    return SparsityError(f"cannot export to the edge runtime: {what} (fx node {node.name!r}) is not supported"
                         f"{'; ' + hint if hint else ''}. Supported: {SUPPORTED}", op=what, node=node.name)


def _tuple(v, n: int) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v)] * n


class Converter:
    def __init__(self, gm: fx.GraphModule, leaf_handlers: dict | None = None):
        self.gm, self.g = gm, Graph()
        self.modules = dict(gm.named_modules())
        self.leaf_handlers = leaf_handlers or {}
        self.input_name: str | None = None
        self.output: str | None = None
        self.module_calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.module_calls[node.target] = self.module_calls.get(node.target, 0) + 1

    # -- helpers ---------------------------------------------------------------------------------------------
    def ref(self, arg, node: fx.Node):
        if isinstance(arg, fx.Node):
            return self.g.alias.get(arg.name, arg.name)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return arg
        raise _unsupported(f"argument {arg!r} of {node.target}", node, "only tensors and numbers are accepted")

    def emit(self, node: fx.Node, op: str, inputs: list, **attrs) -> None:
        self.g.nodes.append({"op": op, "name": node.name, "inputs": inputs, **attrs})

    def arg(self, node: fx.Node, index: int, key: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(key, default)

    # -- the walk --------------------------------------------------------------------------------------------
    def run(self) -> Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.input_name is not None:
                    raise SparsityError("the edge runtime runs models with one tensor input; "
                                        f"{type(self.gm).__name__} takes more ({node.name!r})", node=node.name)
                self.input_name = node.name
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise _unsupported("returning a tuple/dict", node, "return one tensor")
                self.output = self.ref(out, node)
            elif node.op == "get_attr":
                raise _unsupported(f"direct use of the tensor {node.target!r} in forward", node,
                                   "use it through a module (nn.Linear, nn.Conv2d, ...)")
            elif node.op == "call_module":
                self.call_module(node, self.modules[node.target])
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
        return self.g

    def call_module(self, node: fx.Node, m: nn.Module) -> None:
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(f"module {node.target!r} called with {len(node.args)} positional and "
                               f"{len(node.kwargs)} keyword arguments", node, "call modules with one tensor")
        name, x = node.target, self.ref(node.args[0], node)
        handler = next((h for cls, h in self.leaf_handlers.items() if isinstance(m, cls)), None)
        if handler is not None:
            handler(self, node.name, f"{name}.", x, m)
        elif isinstance(m, nn.Linear):
            self.g.matrices[f"{name}.weight"] = to_numpy(dense_weight(m))
            self.emit(node, "linear", [x], weight=f"{name}.weight", bias=self.g.add_raw(f"{name}.bias", m.bias),
                      module=name)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            self.conv(node, m, x)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.batch_norm(node, m, x)
        elif type(m) in ACTIVATION_MODULES:
            kwargs = {"approximate": m.approximate} if isinstance(m, nn.GELU) else {}
            self.emit(node, "act", [x], kind=ACTIVATION_MODULES[type(m)], kwargs=kwargs)
        elif isinstance(m, nn.Softmax):
            if m.dim is None:
                raise _unsupported(f"module {name!r} (Softmax without dim)", node, "pass dim=")
            self.emit(node, "softmax", [x], dim=int(m.dim))
        elif isinstance(m, nn.LayerNorm):
            self.emit(node, "layer_norm", [x], ndim=len(m.normalized_shape), eps=float(m.eps),
                      weight=self.g.add_raw(f"{name}.weight", m.weight), bias=self.g.add_raw(f"{name}.bias", m.bias))
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            self.pool(node, m, x)
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            nd = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
            if any(s != 1 for s in _tuple(m.output_size, nd)):
                raise _unsupported(f"module {name!r} ({type(m).__name__} to {m.output_size})", node,
                                   "only output_size=1 (global average pooling) is supported")
            self.emit(node, "mean", [x], dims=list(range(-nd, 0)), keepdim=True)
        elif isinstance(m, nn.Flatten):
            self.emit(node, "flatten", [x], start=int(m.start_dim), end=int(m.end_dim))
        elif isinstance(m, _ALIAS_MODULES):
            self.g.alias[node.name] = x
        else:
            raise _unsupported(f"module {name!r} ({type(m).__name__})", node)

    def conv(self, node: fx.Node, m: nn.Conv1d | nn.Conv2d, x: str) -> None:
        nd = 1 if isinstance(m, nn.Conv1d) else 2
        if m.padding_mode != "zeros":
            raise _unsupported(f"module {node.target!r} (Conv with padding_mode={m.padding_mode!r})", node,
                               "use padding_mode='zeros'")
        kernel, dilation = _tuple(m.kernel_size, nd), _tuple(m.dilation, nd)
        if isinstance(m.padding, str):  # "valid" / "same": torch puts the odd extra pad on the right
            totals = [0] * nd if m.padding == "valid" else [d * (k - 1) for k, d in zip(kernel, dilation)]
            padding = [[t // 2, t - t // 2] for t in totals]
        else:
            padding = [[p, p] for p in _tuple(m.padding, nd)]
        self.g.matrices[f"{node.target}.weight"] = to_numpy(dense_weight(m)).reshape(m.out_channels, -1)
        self.emit(node, "conv", [x], weight=f"{node.target}.weight", bias=self.g.add_raw(f"{node.target}.bias", m.bias),
                  groups=int(m.groups), in_channels=int(m.in_channels), kernel=kernel, stride=_tuple(m.stride, nd),
                  padding=padding, dilation=dilation, module=node.target)

    def batch_norm(self, node: fx.Node, m: nn.modules.batchnorm._BatchNorm, x: str) -> None:
        if m.running_mean is None:
            raise _unsupported(f"module {node.target!r} (BatchNorm without running stats)", node,
                               "use track_running_stats=True")
        # eval-mode BN is y = x * s + (beta - mean * s), s = gamma / sqrt(var + eps)
        s = m.running_var.detach().float().add(m.eps).rsqrt()
        if m.weight is not None:
            s = s * m.weight.detach().float()
        shift = -m.running_mean.detach().float() * s
        if m.bias is not None:
            shift = shift + m.bias.detach().float()
        s, shift = s.cpu().numpy(), shift.cpu().numpy()
        producer = self.g.nodes[-1] if self.g.nodes else None
        src = node.args[0]
        foldable = (producer is not None and producer["name"] == x and producer["op"] in ("linear", "conv")
                    and isinstance(src, fx.Node) and len(src.users) == 1
                    and self.module_calls.get(producer["module"], 0) == 1)
        if foldable:
            key = producer["weight"]
            self.g.matrices[key] = self.g.matrices[key] * s[:, None]  # zeros stay zero: sparsity is kept
            bias = self.g.raw.get(producer["bias"]) if producer["bias"] else None
            bias_key = producer["bias"] or f"{producer['module']}.bias"
            self.g.raw[bias_key] = ((bias if bias is not None else 0.0) * s + shift).astype(np.float32)
            producer["bias"] = bias_key
            self.g.alias[node.name] = x
            return
        self.g.raw[f"{node.target}.scale"], self.g.raw[f"{node.target}.shift"] = s, shift
        self.emit(node, "affine", [x], scale=f"{node.target}.scale", shift=f"{node.target}.shift")

    def pool(self, node: fx.Node, m: nn.Module, x: str) -> None:
        nd = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
        is_max = isinstance(m, (nn.MaxPool1d, nn.MaxPool2d))
        if m.ceil_mode or getattr(m, "return_indices", False) or getattr(m, "divisor_override", None):
            raise _unsupported(f"module {node.target!r} ({type(m).__name__} with ceil_mode/return_indices/"
                               "divisor_override)", node, "use the defaults")
        kernel = _tuple(m.kernel_size, nd)
        stride = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
        padding = [[p, p] for p in _tuple(m.padding, nd)]
        dilation = _tuple(m.dilation, nd) if is_max else [1] * nd
        self.emit(node, "pool", [x], kind="max" if is_max else "avg", kernel=kernel, stride=stride,
                  padding=padding, dilation=dilation, count_include_pad=bool(getattr(m, "count_include_pad", True)))

    def call_function(self, node: fx.Node) -> None:
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        if fn in ACTIVATION_FUNCTIONS:
            kwargs = {"approximate": node.kwargs.get("approximate", "none")} if fn is F.gelu else {}
            self.emit(node, "act", [self.ref(node.args[0], node)], kind=ACTIVATION_FUNCTIONS[fn], kwargs=kwargs)
        elif fn in _BINARY_FUNCS:
            self.binary(node, _BINARY_FUNCS[fn])
        elif fn in (F.softmax, torch.softmax):
            self.softmax(node, 1)
        elif fn is torch.flatten:
            self.emit(node, "flatten", [self.ref(node.args[0], node)], start=int(self.arg(node, 1, "start_dim", 0)),
                      end=int(self.arg(node, 2, "end_dim", -1)))
        elif fn is torch.reshape:
            self.reshape(node, node.args[1])
        elif fn in (torch.permute,):
            self.emit(node, "permute", [self.ref(node.args[0], node)], dims=[int(d) for d in node.args[1]])
        elif fn is torch.transpose:
            self.emit(node, "transpose", [self.ref(node.args[0], node)], dims=[int(node.args[1]), int(node.args[2])])
        elif fn in (torch.cat, torch.concat):
            tensors = node.args[0]
            if not isinstance(tensors, (tuple, list)):
                raise _unsupported("torch.cat of a non-list", node)
            self.emit(node, "concat", [self.ref(t, node) for t in tensors], dim=int(self.arg(node, 1, "dim", 0)))
        elif fn in _ALIAS_FUNCS:
            self.g.alias[node.name] = self.ref(node.args[0], node)
        else:
            raise _unsupported(f"function {getattr(fn, '__module__', '')}.{name}", node)

    def call_method(self, node: fx.Node) -> None:
        meth, x = node.target, self.ref(node.args[0], node)
        if meth in ACTIVATION_METHODS:
            self.emit(node, "act", [x], kind=ACTIVATION_METHODS[meth], kwargs={})
        elif meth in _BINARY_METHODS:
            self.binary(node, _BINARY_METHODS[meth])
        elif meth == "softmax":
            self.softmax(node, 1)
        elif meth == "flatten":
            self.emit(node, "flatten", [x], start=int(self.arg(node, 1, "start_dim", 0)),
                      end=int(self.arg(node, 2, "end_dim", -1)))
        elif meth in ("reshape", "view"):
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            self.reshape(node, shape)
        elif meth == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            self.emit(node, "permute", [x], dims=[int(d) for d in dims])
        elif meth == "transpose":
            self.emit(node, "transpose", [x], dims=[int(node.args[1]), int(node.args[2])])
        elif meth == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
            self.emit(node, "size", [x], dim=int(node.args[1]))
        elif meth == "mean" and len(node.args) >= 2:
            dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else [node.args[1]]
            self.emit(node, "mean", [x], dims=[int(d) for d in dims], keepdim=bool(self.arg(node, 2, "keepdim", False)))
        elif meth == "contiguous":
            self.g.alias[node.name] = x
        else:
            raise _unsupported(f"tensor method .{meth}()", node)

    def binary(self, node: fx.Node, fn: str) -> None:
        if len(node.args) != 2 or node.kwargs:
            raise _unsupported(f"{fn} with extra arguments {dict(node.kwargs)}", node)
        self.emit(node, "binary", [], fn=fn, args=[self.ref(a, node) for a in node.args])

    def softmax(self, node: fx.Node, index: int) -> None:
        dim = self.arg(node, index, "dim")
        if not isinstance(dim, int):
            raise _unsupported("softmax without an integer dim", node, "pass dim=")
        self.emit(node, "softmax", [self.ref(node.args[0], node)], dim=dim)

    def reshape(self, node: fx.Node, shape) -> None:
        refs = [self.ref(s, node) for s in shape]
        if any(isinstance(s, float) for s in refs):
            raise _unsupported(f"reshape to {shape}", node)
        self.emit(node, "reshape", [self.ref(node.args[0], node)], shape=refs)
