"""A torch-free runtime for sparse models exported with ``sparsetorch export MODEL --edge OUT.spt``.

Only numpy and safetensors are needed (plus sparsetorch's compiled CSR and bitmask kernels when they are built;
compact weights stay compact in memory, see docs/edge.md)::

    import sparsetorch.edge as edge
    model = edge.load("digits.spt")
    logits = model(x)                       # x: float32 numpy array, [N, 64]
    text = model.generate(b"def ", 20)      # transformer files only (byte GPT, transformers Llama): KV cache

Nothing here imports torch, directly or indirectly (tests/test_edge.py checks it in a fresh interpreter).
"""
from __future__ import annotations

from ..errors import SparsityError
from .model import FORMAT, VERSION, EdgeModel, load, read_file

__all__ = ["load", "EdgeModel", "read_file", "FORMAT", "VERSION", "SparsityError"]
