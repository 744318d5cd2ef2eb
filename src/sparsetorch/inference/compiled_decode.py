"""``compile_decode``: run a converted model's decode steps through ``torch.compile``.

Generating one token runs hundreds of small Python calls (each layer, RoPE, norms, attention, the KV cache);
on CPU they cost milliseconds per token, as much as the sparse weights of a 1B model. ``torch.compile`` traces
them into one graph: the sparse layers appear in it as ``torch.ops.sparsetorch`` operators
(``kernels.custom_ops``), so a model from ``to_inference`` compiles without graph breaks. For a Hugging Face
decoder this uses transformers' own recipe: a static KV cache (fixed shapes, so one graph serves every step)
and its ``compile_config``, which compiles the decode step and runs the prompt (prefill) eagerly, with
grouped-query attention that reads the cache without repeating it (``gqa_attention``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparsityError
from .gqa_attention import use_packed_decode_attention

__all__ = ["compile_decode"]


def compile_decode(model: nn.Module, *, fullgraph: bool = False, **compile_kwargs) -> nn.Module:
    """``model`` set up so that ``generate()`` compiles its decode step (a transformers model: static KV cache,
    prefill eager), or ``torch.compile(model)`` for any other module. ``fullgraph=True`` makes a graph break an
    error instead of a slower graph (layers on torch's sparse kernels ``torch-csr`` / ``torch-bsr`` and fused
    chains still break it). Extra keywords go to ``torch.compile``. The first ``generate`` compiles (tens of
    seconds on CPU); later calls with the same prompt length + ``max_new_tokens`` reuse the graph. Graphs of
    every model compiled in one process count against dynamo's recompile limit (8 by default), past which
    generate silently runs eager: call ``torch._dynamo.reset()`` before compiling another model. A transformers
    model with grouped-query ``sdpa`` attention is switched (in place) to ``gqa_attention``'s, the same math."""
    if not hasattr(torch, "compile"):
        raise SparsityError("compile_decode needs torch.compile (PyTorch 2.0 or later)", got=torch.__version__)
    config = getattr(model, "generation_config", None)
    if not hasattr(model, "generate") or config is None:
        return torch.compile(model, fullgraph=fullgraph, **compile_kwargs)
    try:
        from transformers import CompileConfig
    except ImportError as exc:
        raise SparsityError("compile_decode on a generate() model needs transformers with CompileConfig (4.48+)",
                            fix="pip install -U transformers") from exc
    # "default": the transformers default "reduce-overhead" means CUDA graphs, nothing on CPU
    # (torch.compile takes a mode or options, not both)
    mode = compile_kwargs.pop("mode", None if "options" in compile_kwargs else "default")
    compile_config = CompileConfig(fullgraph=fullgraph, mode=mode, **compile_kwargs)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless this is set
    config.cache_implementation = "static"
    config.compile_config = compile_config
    use_packed_decode_attention(model)
    return model
