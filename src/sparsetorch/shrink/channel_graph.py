"""Find dependency groups by tracing the model with torch.fx and following channel dimensions.

Every traced tensor carries a *layout*: for each dimension that holds tracked channels, the list
of segments ``(group, inner)`` that make it up (concatenation gives several segments; flattening
conv channels into features multiplies ``inner``). Layers create groups (their outputs), extend
them (BatchNorm, depthwise conv) or read them (their inputs). Elementwise ops between tensors
union their groups (a residual ``a + b`` ties the channels of a and b). Anything not understood
blocks the groups it touches, with the reason, so that they are left as they are.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..tracing import TraceFailed, trace
from ..tracing.activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES
from .groups import Group, Member, is_depthwise, is_plain_conv

__all__ = ["trace_groups", "TraceFailed"]


@dataclass(frozen=True)
class Seg:
    group: Group
    inner: int = 1

    @property
    def width(self) -> int:
        return self.group.find().size * self.inner


Layout = dict[int, list[Seg]]  # dim -> segments along it

_ELEMENTWISE_FN = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.clamp, torch.clip, torch.abs, torch.exp,
    F.relu6, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.dropout, F.dropout1d,
    F.dropout2d, torch.square, *ACTIVATION_FUNCTIONS,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "clamp", "clip", "abs", "exp", "contiguous", "clone", "detach", "add_",
    "mul_", "square", "float", "to", "type_as", *ACTIVATION_METHODS,
}
_SHAPE_KEEPING_FN = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                     F.adaptive_max_pool2d, F.interpolate}
_ELEMENTWISE_MODULES = (*ACTIVATION_MODULES, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
                        nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
_REDUCE = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}


def trace_groups(model: nn.Module, args: tuple) -> list[Group]:
    """Dependency groups of ``model`` run on ``args`` (raises TraceFailed if fx cannot trace it)."""
    gm = trace(model)  # TraceFailed when fx cannot
    was_training = model.training
    model.eval()  # BatchNorm statistics must not move while we look
    try:
        with torch.no_grad():
            _Shapes(gm).run(*args)
    except Exception as exc:
        raise TraceFailed(f"running the traced graph on example_inputs failed: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    walker = _Walker(gm)
    for node in gm.graph.nodes:
        walker.visit(node)
    roots: dict[int, Group] = {}
    for g in walker.groups:
        r = g.find()
        roots.setdefault(id(r), r)
    groups = list(roots.values())
    _block_shared(gm, groups)
    return groups


def _block_shared(gm: fx.GraphModule, groups: list[Group]) -> None:
    """A layer called twice, or sharing a weight with another, cannot be resized for one use only."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    owners: dict[int, list[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    shared = {n: f"layer {n} is called {c} times" for n, c in calls.items() if c > 1}
    for names in owners.values():
        if len(set(names)) > 1:
            shared.update({n: f"layers {' and '.join(sorted(set(names)))} share a weight" for n in names})
    for g in groups:
        for m in g.members:
            if m.module in shared:
                g.block(shared[m.module])


class _Shapes(fx.Interpreter):
    """Runs the graph once and records every tensor's shape (torch's ShapeProp imports sympy: slow)."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["sparsetorch_shape"] = tuple(result.shape)
        return result


def _shape(node) -> tuple[int, ...] | None:
    return node.meta.get("sparsetorch_shape") if isinstance(node, fx.Node) else None


class _Walker:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout] = {}
        self.groups: list[Group] = []

    # helpers -------------------------------------------------------------------------------
    def new_group(self, size: int, *members: Member, blocked: str | None = None) -> Group:
        g = Group(size, list(members), [blocked] if blocked else [])
        self.groups.append(g)
        return g

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _shape(n) is not None else None)
        return found

    def block_all(self, nodes, reason: str) -> None:
        for n in nodes:
            for segs in self.layouts.get(n, {}).values():
                for s in segs:
                    s.group.block(reason)

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"layer {node.target} ({type(self.modules[node.target]).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"op {target} (fx node {node.name})"

    # dispatch ------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            self.layouts[node] = {}
            return
        if node.op == "output":
            self.block_all(self.tensor_inputs(node), "its channels are model outputs")
            return
        ins = self.tensor_inputs(node)
        if _shape(node) is None:  # sizes, shapes, tuples: no channel values flow on
            if node.op == "call_method" and node.target in ("size", "dim") or node.target is getattr:
                return  # x.size(0), x.shape: metadata, not channel values
            if not any(self.layouts.get(n) for n in ins):
                return
        handler = self.handler(node)
        if handler is None:
            if any(self.layouts.get(n) for n in ins):
                self.block_all(ins, f"{self.describe(node)} is not supported for channel removal")
            self.layouts[node] = {}
            return
        self.layouts[node] = handler(node, ins)

    def handler(self, node):
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Linear):
                return self.linear
            if is_plain_conv(m) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
                return self.conv
            if is_depthwise(m) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
                return self.follow
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                return self.follow
            if isinstance(m, nn.modules.conv._ConvNd):
                return self.grouped_conv
            if isinstance(m, _ELEMENTWISE_MODULES):
                return self.elementwise
            if isinstance(m, _POOL_MODULES):
                return self.shape_keeping
            if isinstance(m, nn.Flatten):
                return self.reshape
            if isinstance(m, nn.LayerNorm):
                return self.layer_norm
            if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
                return self.softmax
            return None
        fn, name = node.target, node.target if node.op == "call_method" else None
        if node.op == "call_function":
            if fn in _ELEMENTWISE_FN:
                return self.elementwise
            if fn in _SHAPE_KEEPING_FN:
                return self.shape_keeping
            if fn is torch.cat or fn is torch.concat:
                return self.cat
            if fn in (torch.flatten, torch.reshape):
                return self.reshape
            if fn in (torch.mean, torch.sum, torch.amax, torch.amin):
                return self.reduce
            if fn in (torch.permute, torch.transpose):
                return self.permute
            if fn in (F.softmax, F.log_softmax, torch.softmax):
                return self.softmax
            return None
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise
        if name in _RESHAPE_METHODS:
            return self.reshape
        if name in _REDUCE:
            return self.reduce
        if name in ("permute", "transpose"):
            return self.permute
        if name in ("softmax", "log_softmax"):
            return self.softmax
        return None

    # layers --------------------------------------------------------------------------------
    def consume(self, node, x: fx.Node, dim: int) -> Layout:
        """Record ``node``'s layer as reading ``x``'s channels on ``dim``; other tracked dims pass."""
        layout = self.layouts.get(x, {})
        offset = 0
        for seg in layout.get(dim, []):
            if node.op == "call_module" and is_plain_conv(self.modules[node.target]) and seg.inner != 1:
                seg.group.block(f"{self.describe(node)} reads them reshaped")
            seg.group.find().members.append(Member(node.target, "in", offset, seg.inner))
            offset += seg.width
        return {d: segs for d, segs in layout.items() if d != dim}

    def linear(self, node, ins):
        x = node.args[0]
        out_shape = _shape(node)
        last = len(out_shape) - 1
        layout = self.consume(node, x, last)
        layout[last] = [Seg(self.new_group(out_shape[last], Member(node.target, "out")))]
        return layout

    def conv(self, node, ins):
        x = node.args[0]
        layout = self.consume(node, x, 1)
        for d, segs in layout.items():  # channels along batch/spatial dims would be mixed by the kernel
            if d >= 2:
                for s in segs:
                    s.group.block(f"{self.describe(node)} slides over them")
        layout = {d: s for d, s in layout.items() if d < 2}
        layout[1] = [Seg(self.new_group(_shape(node)[1], Member(node.target, "out")))]
        return layout

    def follow(self, node, ins):
        """BatchNorm / depthwise conv: per-channel parameters, the channel passes through."""
        layout = self.layouts.get(node.args[0], {})
        offset = 0
        for seg in layout.get(1, []):
            if seg.inner != 1:
                seg.group.block(f"{self.describe(node)} reads them reshaped")
            seg.group.find().members.append(Member(node.target, "follow", offset, seg.inner))
            offset += seg.width
        if _shape(node) != _shape(node.args[0]):
            return self.shape_keeping(node, ins)
        return dict(layout)

    def grouped_conv(self, node, ins):
        reason = f"{self.describe(node)} is a grouped convolution (groups={self.modules[node.target].groups})"
        self.block_all(ins, reason)
        return {1: [Seg(self.new_group(_shape(node)[1], Member(node.target, "out"), blocked=reason))]}

    def layer_norm(self, node, ins):
        m = self.modules[node.target]
        ndim = len(_shape(node))
        normed = set(range(ndim - len(m.normalized_shape), ndim))
        layout = dict(self.layouts.get(node.args[0], {}))
        for d in list(layout):
            if d in normed:  # its mean/variance include the zeros: removing them changes the output
                for s in layout.pop(d):
                    s.group.block(f"{self.describe(node)} normalizes over them (its statistics would change)")
        return layout

    def softmax(self, node, ins):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if node.op == "call_module":
            dim = self.modules[node.target].dim
        ndim = len(_shape(node))
        layout = dict(self.layouts.get(ins[0], {}))
        for d in list(layout):
            if dim is None or d == dim % ndim:
                for s in layout.pop(d):
                    s.group.block(f"{self.describe(node)} normalizes over them")
        return layout

    # ops -----------------------------------------------------------------------------------
    def elementwise(self, node, ins):
        """Broadcasting elementwise op: tracked dims of all operands must agree (residual add unions)."""
        out = _shape(node)
        result: Layout = {}
        for j in range(len(out)):
            present, opaque = [], False
            for n in ins:
                shape = _shape(n)
                d = j - (len(out) - len(shape))
                if d < 0 or shape[d] == 1 and out[j] != 1:
                    continue
                segs = self.layouts.get(n, {}).get(d)
                if segs:
                    present.append(segs)
                elif shape[d] > 1:
                    opaque = True
            if not present:
                continue
            if opaque:
                for segs in present:
                    for s in segs:
                        s.group.block(f"{self.describe(node)} combines them with an untracked tensor")
                continue
            result[j] = self.unify(present, node)
        return result

    def unify(self, present: list[list[Seg]], node) -> list[Seg]:
        first = present[0]
        for other in present[1:]:
            if [s.width for s in other] == [s.width for s in first] and [s.inner for s in other] == [s.inner for s in first]:
                for a, b in zip(first, other):
                    a.group.union(b.group, f"{self.describe(node)} ties groups of different sizes")
            else:
                for segs in (first, other):
                    for s in segs:
                        s.group.block(f"{self.describe(node)} combines differently laid out channels")
        return first

    def shape_keeping(self, node, ins):
        """Pooling/interpolation: batch and channel dims stay, spatial sizes change."""
        x, out = ins[0], _shape(node)
        layout = {}
        for d, segs in self.layouts.get(x, {}).items():
            if d < len(out) and (d < 2 or out[d] == _shape(x)[d]):
                layout[d] = segs
            else:
                for s in segs:
                    s.group.block(f"{self.describe(node)} resizes the dimension holding them")
        return layout

    def cat(self, node, ins):
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out = _shape(node)
        dim %= len(out)
        result: Layout = {}
        segs_cat: list[Seg] = []
        for t in tensors:
            segs = self.layouts.get(t, {}).get(dim)
            if not segs:  # an untracked part: its own blocked group keeps offsets right
                segs = [Seg(self.new_group(_shape(t)[dim], blocked="concatenated with untracked channels"))]
            segs_cat += segs
        if any(self.layouts.get(t, {}).get(dim) for t in tensors):
            result[dim] = segs_cat
        for j in range(len(out)):
            if j == dim:
                continue
            present = [self.layouts[t][j] for t in tensors if self.layouts.get(t, {}).get(j)]
            if present and len(present) < len(tensors):
                for segs in present:
                    for s in segs:
                        s.group.block(f"{self.describe(node)} concatenates them with untracked tensors")
            elif present:
                result[j] = self.unify(present, node)
        return result

    def reshape(self, node, ins):
        x = ins[0]
        s, t = _shape(x), _shape(node)
        literal = [a for a in node.args[1:] if isinstance(a, int)] + [
            a for a in (node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (tuple, list)) else ())
            if isinstance(a, int)]
        layout = {}
        for d, segs in self.layouts.get(x, {}).items():
            j = _reshape_dim(s, t, d)
            if j is None:
                reason = f"{self.describe(node)} splits or interleaves them"
            elif node.op != "call_module" and node.target not in ("flatten", torch.flatten) and t[j] in literal:
                reason = f"{self.describe(node)} hard-codes their count ({t[j]})"
            else:
                k = t[j] // s[d]
                layout[j] = [Seg(seg.group, seg.inner * k) for seg in segs]
                continue
            for seg in segs:
                seg.group.block(reason)
        return layout

    def reduce(self, node, ins):
        x = ins[0]
        ndim = len(_shape(x))
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = set(range(ndim)) if dim is None else {d % ndim for d in ((dim,) if isinstance(dim, int) else dim)}
        layout = {}
        for d, segs in self.layouts.get(x, {}).items():
            if d in dims:
                for s in segs:
                    s.group.block(f"{self.describe(node)} reduces over them")
            else:
                layout[d if keep else d - sum(r < d for r in dims)] = segs
        return layout

    def permute(self, node, ins):
        x = ins[0]
        ndim = len(_shape(x))
        rest = list(node.args[1:])
        if node.target in ("transpose", torch.transpose):
            a, b = (rest + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
            perm = list(range(ndim))
            perm[a % ndim], perm[b % ndim] = perm[b % ndim], perm[a % ndim]
        else:
            perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            perm = [p % ndim for p in perm]
        old = self.layouts.get(x, {})
        return {j: old[p] for j, p in enumerate(perm) if p in old}


def _reshape_dim(s: tuple[int, ...], t: tuple[int, ...], d: int) -> int | None:
    """Output dim holding input dim ``d`` whole and leading (flatten of d..k), or None."""
    pre = math.prod(s[:d])
    acc = 1
    for j, size in enumerate(t):
        if acc == pre and size >= s[d] and size % s[d] == 0 and size > 1:
            end, p = acc * size, pre
            for k in range(d, len(s)):
                p *= s[k]
                if p == end:
                    return j
                if p > end:
                    break
        acc *= size
    return None
