"""Loading an edge file and running its layer graph with numpy.

The file is safetensors: weight arrays (see ``weights.py``) plus, in the metadata under
``"sparsetorch.edge"``, a JSON description::

    {"format": "sparsetorch-edge", "version": 1,
     "input": {"name": "x", "shape": [null, 64], "dtype": "float32"},   # null = any size (batch)
     "output": "classifier",
     "tensors": {"fc1.weight": {"shape": [256, 64], "layout": "csr", "values": "int8", "nnz": 1638}, ...},
     "nodes": [{"op": "linear", "name": "fc1", "inputs": ["x"], "weight": "fc1.weight", "bias": "fc1.bias"}, ...]}

Nodes run in order; each stores its result under its name and reads earlier results by name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SparsityError
from . import ops
from .linear import BACKENDS, Linear
from .weights import Weight, decode_matrix

FORMAT = "sparsetorch-edge"
VERSION = 3  # the newest this runtime reads; exporters write the oldest version that describes the model
# 2: a "gpt" node may list heads per block (models shrunk by sparsetorch.shrink); 3: bitmask weights in the
# decode kernels' layout (mask words + row starts), bf16 / fp16 values, "llama" nodes
READABLE_VERSIONS = (1, 2, 3)
META_KEY = "sparsetorch.edge"
Env = dict


def read_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(description, arrays) of an edge file, or SparsityError saying what is wrong with it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SparsityError(f"no such file: {path}", path=str(path))
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several types for bad headers/data
        raise SparsityError(f"{path} is not a readable safetensors file ({exc}); it is corrupted or truncated",
                            path=str(path)) from None
    if META_KEY not in metadata:
        raise SparsityError(f"{path} is not a sparsetorch edge file; write one with "
                            "`sparsetorch export MODEL --edge OUT.spt` or sparsetorch.export_edge", path=str(path))
    try:
        desc = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        raise SparsityError(f"{path} has a corrupted edge description", path=str(path)) from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise SparsityError(f"{path} is not a {FORMAT} file (format {desc.get('format') if isinstance(desc, dict) else None!r})",
                            path=str(path))
    if desc.get("version") not in READABLE_VERSIONS:
        raise SparsityError(
            f"{path} is {FORMAT} version {desc.get('version')!r}; this runtime reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} only. "
            "Re-export the model with the same sparsetorch version as the runtime", path=str(path),
            version=desc.get("version"))
    return desc, arrays


class EdgeModel:
    """A model loaded from an edge file: ``model(x) -> y`` on float32 numpy arrays, no torch."""

    def __init__(self, desc: dict, arrays: dict[str, np.ndarray], backend: str = "auto"):
        if backend not in BACKENDS:
            raise SparsityError(f"backend must be one of {BACKENDS}, got {backend!r}", backend=backend)
        self.description = desc
        self.backend = backend
        self._arrays = arrays
        self._tensors = desc.get("tensors", {})
        self.input_spec = desc["input"]
        self.output = desc["output"]
        self._steps: list[tuple[str, Callable[[Env], object]]] = []
        self.transformer = None
        if not isinstance(desc.get("nodes"), list) or not isinstance(self.input_spec, dict) \
                or not isinstance(self.input_spec.get("shape"), list):
            raise SparsityError("the edge description lacks its node list or input spec; the file is corrupted")
        known = {self.input_spec.get("name")}
        for node in desc["nodes"]:
            # a graph that reads a value before it exists (or never produces its output) is corrupted
            for ref in node.get("inputs", []) if isinstance(node, dict) else [None]:
                if not isinstance(ref, str) or ref not in known:
                    raise SparsityError(f"node {node.get('name') if isinstance(node, dict) else node!r} reads "
                                        f"{ref!r}, which no earlier node makes; the file is corrupted")
            known.add(node.get("name"))
            try:
                builder = _BUILDERS[node["op"]]
            except KeyError:
                raise SparsityError(f"node {node.get('name')!r} has op {node.get('op')!r}, which this runtime does "
                                    "not know; the file is corrupted or from a newer sparsetorch") from None
            self._steps.append((node["name"], builder(self, node)))
        if not isinstance(self.output, str) or self.output not in known:
            raise SparsityError(f"the edge file's output {self.output!r} is not a node of its graph; it is corrupted")
        del self._arrays  # the prepared ops hold what they need; free the raw (e.g. int8) copies

    # -- weights ---------------------------------------------------------------------------------------------
    def array(self, name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        if name not in self._arrays:
            raise SparsityError(f"the edge file lacks tensor {name!r}; it is corrupted")
        return self._arrays[name].astype(np.float32)

    def matrix(self, name: str) -> Weight:
        meta = self._tensors.get(name)
        if meta is None:
            raise SparsityError(f"the edge file lacks weight {name!r}; it is corrupted")
        prefix = f"{name}/"
        return decode_matrix(name, {k[len(prefix):]: v for k, v in self._arrays.items() if k.startswith(prefix)}, meta)

    def linear(self, weight: str, bias: str | None) -> Linear:
        return Linear(self.matrix(weight), self.array(bias), self.backend)

    # -- running ---------------------------------------------------------------------------------------------
    def check_input(self, x) -> np.ndarray:
        spec = self.input_spec["shape"]
        x = np.asarray(x)
        if x.ndim != len(spec) or any(s is not None and s != d for s, d in zip(spec, x.shape)):
            want = "[" + ", ".join("N" if s is None else str(s) for s in spec) + "]"
            raise SparsityError(f"input has shape {list(x.shape)} but the model expects {want} (N: any size)",
                                shape=list(x.shape), expected=spec)
        if self.input_spec.get("dtype", "float32") == "int64":
            if not np.issubdtype(x.dtype, np.integer):
                raise SparsityError(f"input must hold integer token ids, got dtype {x.dtype}")
            return x.astype(np.int64)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, x) -> np.ndarray:
        env: Env = {self.input_spec["name"]: self.check_input(x)}
        try:
            for name, step in self._steps:
                env[name] = step(env)
            return np.asarray(env[self.output], dtype=np.float32)
        except SparsityError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            # the input was checked above: a step failing this way means the graph's parameters are bad
            raise SparsityError(f"the edge file's graph failed at run time ({exc!r}); it is corrupted or was "
                                "edited; re-export it") from None

    def generate(self, prompt: bytes | list[int] | np.ndarray, n: int, *, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> bytes | list[int]:
        """Append ``n`` tokens to ``prompt`` (bytes or token ids) with the KV cache: greedy when
        temperature == 0, else sampled (optionally from the ``top_k`` likeliest) with
        ``np.random.default_rng(seed)``. Returns prompt + new tokens, as bytes when given bytes; stops early
        after an end-of-sequence token of the model (a Llama's ``eos_token_id``), as transformers does."""
        if self.transformer is None:
            raise SparsityError("generate() needs a model exported from a decoder-only transformer (sparsetorch's "
                                "GPT or a transformers Llama); this file holds a feed-forward graph: call the model "
                                "instead")
        return self.transformer.generate(prompt, n, temperature=temperature, top_k=top_k, seed=seed)

    def __repr__(self) -> str:
        ops_ = [node["op"] for node in self.description["nodes"]]
        return f"EdgeModel(input={self.input_spec['shape']}, nodes={len(ops_)}, backend={self.backend!r})"


def load(path: str | os.PathLike, backend: str = "auto") -> EdgeModel:
    """Load an edge file. backend: "auto" (compiled CSR / bitmask kernels when built, else numpy), "compiled",
    "numpy" (no compiled code) or "dense" (decompress every weight to a dense float32 matrix at load)."""
    desc, arrays = read_file(path)
    try:
        return EdgeModel(desc, arrays, backend)
    except SparsityError:
        raise
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise SparsityError(f"{path} has a malformed edge description ({exc!r}); it is corrupted") from None


# -- node builders: (model, node) -> step(env) -> value ------------------------------------------------------
def _ref(env: Env, value):
    return env[value] if isinstance(value, str) else value


def _linear(m: EdgeModel, node: dict):
    lin, src = m.linear(node["weight"], node.get("bias")), node["inputs"][0]

    def step(env):
        x = env[src]
        if x.shape[-1] != lin.in_features:
            raise SparsityError(f"{node['name']}: expected {lin.in_features} input features, got shape "
                                f"{list(x.shape)}", node=node["name"])
        return lin(x)
    return step


def _conv(m: EdgeModel, node: dict):
    groups = [m.linear(w, b) for w, b in zip(node["weights"], node["biases"])]
    src, args = node["inputs"][0], (node["kernel"], node["stride"], node["padding"], node["dilation"])
    channels = node["in_channels"]

    def step(env):
        x = env[src]
        if x.ndim != 2 + len(node["kernel"]) or x.shape[1] != channels:
            raise SparsityError(f"{node['name']}: expected input [N, {channels}, ...] with {len(node['kernel'])} "
                                f"spatial dims, got shape {list(x.shape)}", node=node["name"])
        return ops.conv(x, groups, *args)
    return step


def _pool(m: EdgeModel, node: dict):
    src = node["inputs"][0]
    args = (node["kind"], node["kernel"], node["stride"], node["padding"], node["dilation"],
            node.get("count_include_pad", True))
    return lambda env: ops.pool(env[src], *args)


def _act(m: EdgeModel, node: dict):
    fn, src, kw = ops.ACTIVATIONS[node["kind"]], node["inputs"][0], node.get("kwargs", {})
    return lambda env: fn(env[src], **kw).astype(np.float32, copy=False)


def _softmax(m: EdgeModel, node: dict):
    src, dim = node["inputs"][0], node["dim"]
    return lambda env: ops.softmax(env[src], dim)


def _layer_norm(m: EdgeModel, node: dict):
    src, w, b = node["inputs"][0], m.array(node.get("weight")), m.array(node.get("bias"))
    return lambda env: ops.layer_norm(env[src], node["ndim"], w, b, node["eps"])


def _affine(m: EdgeModel, node: dict):  # a BatchNorm that could not be folded: y = x * scale + shift per channel
    src, scale, shift = node["inputs"][0], m.array(node["scale"]), m.array(node["shift"])

    def step(env):
        x = env[src]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)
    return step


_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


def _binary(m: EdgeModel, node: dict):
    fn, args = _BINARY[node["fn"]], node["args"]  # args: value names (str) or numbers
    return lambda env: np.asarray(fn(_ref(env, args[0]), _ref(env, args[1])), dtype=np.float32)


def _flatten(m: EdgeModel, node: dict):
    src, start, end = node["inputs"][0], node["start"], node["end"]

    def step(env):
        x = env[src]
        s, e = start % x.ndim, end % x.ndim
        return x.reshape(*x.shape[:s], -1, *x.shape[e + 1:]) if x.ndim else x.reshape(1)
    return step


def _reshape(m: EdgeModel, node: dict):
    src, shape = node["inputs"][0], node["shape"]

    def step(env):
        x = env[src]
        target = [int(_ref(env, s)) for s in shape]
        try:
            return x.reshape(target)
        except ValueError:
            raise SparsityError(f"{node['name']}: cannot reshape an input of shape {list(x.shape)} to {target}",
                                node=node["name"]) from None
    return step


def _permute(m: EdgeModel, node: dict):
    src, dims = node["inputs"][0], node["dims"]
    return lambda env: np.transpose(env[src], dims)


def _transpose(m: EdgeModel, node: dict):
    src, (a, b) = node["inputs"][0], node["dims"]
    return lambda env: np.swapaxes(env[src], a, b)


def _size(m: EdgeModel, node: dict):
    src, dim = node["inputs"][0], node["dim"]
    return lambda env: int(env[src].shape[dim])


def _mean(m: EdgeModel, node: dict):
    src, dims, keep = node["inputs"][0], tuple(node["dims"]), node["keepdim"]
    return lambda env: env[src].mean(axis=dims, keepdims=keep, dtype=np.float32)


def _concat(m: EdgeModel, node: dict):
    srcs, dim = node["inputs"], node["dim"]
    return lambda env: np.concatenate([env[s] for s in srcs], axis=dim)


def _gpt(m: EdgeModel, node: dict):
    from .transformer import Transformer

    m.transformer = Transformer(m, node)
    src = node["inputs"][0]
    return lambda env: m.transformer.forward(env[src])


def _llama(m: EdgeModel, node: dict):
    from .llama import LlamaDecoder

    m.transformer = LlamaDecoder(m, node)
    src = node["inputs"][0]
    return lambda env: m.transformer.forward(env[src])


_BUILDERS = {
    "linear": _linear, "conv": _conv, "pool": _pool, "act": _act, "softmax": _softmax, "layer_norm": _layer_norm,
    "affine": _affine, "binary": _binary, "flatten": _flatten, "reshape": _reshape, "permute": _permute,
    "transpose": _transpose, "size": _size, "mean": _mean, "concat": _concat, "gpt": _gpt, "llama": _llama,
}
