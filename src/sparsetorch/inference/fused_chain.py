"""FusedChain: consecutive Linear layers (+ elementwise activations) run by one native call.

A small MLP spends most of its time in per-layer overhead (each layer call, each activation, each
allocation costs microseconds in Python while the arithmetic of a 90%-sparse 256x256 layer takes about
one). :class:`FusedChain` runs ``act_L(W_L ... act_1(W_1 x + b_1) ... + b_L)`` in a single call of the
compiled core (csrc/chain.cpp): activations stay in the kernels' transposed panel layout between layers
and never come back to Python. Without the compiled kernels it runs its layers one by one on torch's
sparse kernels.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsityError
from ..kernels import inference_ops
from ..kernels.packed import BSRWeight, CSRWeight, DenseWeight, NMWeight, PackedWeight

__all__ = ["FusedChain", "ChainStep", "ACTIVATIONS", "pack_for_chain"]

# activation name -> (code in csrc/chain.h, the torch function it equals)
ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": (0, lambda t: t),
    "relu": (1, torch.relu),
    "gelu": (2, F.gelu),
    "gelu_tanh": (3, lambda t: F.gelu(t, approximate="tanh")),
    "tanh": (4, torch.tanh),
    "sigmoid": (5, torch.sigmoid),
}
_KIND = {"csr": 0, "nm": 1, "bsr": 2, "dense": 3}


@dataclass
class ChainStep:
    """One layer of a chain: its qualified name in the model, dense weight [out, in], bias, activation."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    act: str = "none"


def pack_for_chain(w: torch.Tensor, fmt: str) -> PackedWeight:
    """Pack w as "csr", "nm:N:M", "bsr:RxC" (the kernel names to_inference measures) or "dense"."""
    if fmt == "dense":
        return DenseWeight.from_dense(w)
    if fmt.startswith("nm:"):
        _, n, m = fmt.split(":")
        return NMWeight.from_dense(w, int(n), int(m))
    if fmt.startswith("bsr:"):
        r, c = fmt[4:].split("x")
        return BSRWeight.from_dense(w, int(r), int(c))
    return CSRWeight.from_dense(w)


def _forget_native_before_load(module: "FusedChain", *args) -> None:
    module._native = None


def _forget_native(module: "FusedChain", incompatible_keys) -> None:
    module._native = None  # load_state_dict may have replaced buffers (assign=True)


class FusedChain(nn.Module):
    """``x [..., in] -> [..., out]`` through every layer of the chain in one compiled call.

    ``threads``: None follows ``torch.get_num_threads()``; 1 keeps the call on the calling thread (faster for
    tiny chains on a shared CPU). The native handle holds the buffers' addresses: it is rebuilt after
    ``.to()`` / ``load_state_dict`` and dropped by copy and pickle.
    """

    def __init__(self, weights: list[PackedWeight], biases: list[torch.Tensor | None], acts: list[str],
                 names: list[str] | None = None, threads: int | None = None):
        super().__init__()
        if not weights or not (len(weights) == len(biases) == len(acts)):
            raise SparsityError("a chain needs one bias (or None) and one activation per weight")
        for a, b in zip(weights, weights[1:]):
            if a.out_features != b.in_features:
                raise SparsityError(f"chain layers do not connect: {a.out_features} outputs into {b.in_features} inputs")
        unknown = [a for a in acts if a not in ACTIVATIONS]
        if unknown:
            raise SparsityError(f"unsupported activation(s) {unknown}; use one of {sorted(ACTIVATIONS)}")
        self.weights = nn.ModuleList(weights)
        for i, b in enumerate(biases):
            self.register_buffer(f"bias{i}", None if b is None else b.detach().to("cpu", torch.float32).contiguous())
        self.acts = list(acts)
        self.names = list(names or [f"layer{i}" for i in range(len(weights))])
        self.in_features, self.out_features = weights[0].in_features, weights[-1].out_features
        self.threads = threads
        self._native = None  # (run, isa level, tile, Chain), False when unavailable, None = not built yet
        # dropped before a load touches any buffer too: a load that fails half-way (assign=True) must not
        # leave the native handle pointing at freed tensors
        self.register_load_state_dict_pre_hook(_forget_native_before_load)
        self.register_load_state_dict_post_hook(_forget_native)

    @classmethod
    def from_steps(cls, steps: list[ChainStep], formats: list[str] | None = None, threads: int | None = None):
        formats = formats or ["csr"] * len(steps)
        return cls([pack_for_chain(s.weight, f) for s, f in zip(steps, formats)], [s.bias for s in steps],
                   [s.act for s in steps], [s.name for s in steps], threads)

    def biases(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"bias{i}") for i in range(len(self.acts))]

    # ------------------------------------------------------------------ native handle
    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: buffers move, addresses change
        self._native = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_native"] = None
        return state

    def _build(self):
        if not inference_ops.available() or any(w.values.device.type != "cpu" for w in self.weights):
            self._native = False
            return False
        specs = []
        for w, b, act in zip(self.weights, self.biases(), self.acts):
            if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
                raise SparsityError("FusedChain biases must be contiguous float32")
            specs.append((_KIND[w.format], ACTIVATIONS[act][0], 0 if b is None else b.data_ptr(), *w._static()))
        widest = max(max(w.in_features, w.out_features) for w in self.weights)
        chain = inference_ops.make_chain(specs)
        self._native = (chain.run, inference_ops.isa_level(), inference_ops.chain_tile(widest), chain)
        return self._native

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        native = self._native if self._native is not None else self._build()
        if native and x.dtype is torch.float32 and x.is_contiguous() and x.is_cpu and x.dim() == 2 \
                and x.shape[1] == self.in_features:  # hot path: these checks and one native call
            n = x.shape[0]
            y = torch.empty(n, self.out_features)
            native[0](native[1], self.threads or torch.get_num_threads(), native[2], x.data_ptr(), n, self.in_features,
                      y.data_ptr())
            return y
        if x.shape[-1] != self.in_features:
            raise SparsityError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        if native and x.is_cpu:
            x2 = x2.float()
            if x2.stride(1) != 1 or x2.stride(0) < self.in_features:
                x2 = x2.contiguous()
            y = torch.empty(x2.shape[0], self.out_features)
            native[0](native[1], self.threads or torch.get_num_threads(), native[2], x2.data_ptr(), x2.shape[0],
                      x2.stride(0), y.data_ptr())
        else:
            y = self.run_layers(x2)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The same result layer by layer on torch's sparse kernels (the path without the extension)."""
        y = x.float()
        for w, b, act in zip(self.weights, self.biases(), self.acts):
            y = ACTIVATIONS[act][1](w.linear(y, b, backend="torch"))
        return y

    def extra_repr(self) -> str:
        layers = ", ".join(f"{n}[{w.format} {w.out_features}x{w.in_features}]" + ("" if a == "none" else f"+{a}")
                           for n, w, a in zip(self.names, self.weights, self.acts))
        threads = "" if self.threads is None else f", threads={self.threads}"
        return layers + threads
