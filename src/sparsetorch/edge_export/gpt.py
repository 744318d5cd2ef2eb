"""Exporting sparsetorch's byte-level GPT as one edge "gpt" node (the runtime runs it with a KV cache)."""
from __future__ import annotations


def handlers() -> dict:
    """{module class: handler(converter, fx_node, module)} for transformer stacks the runtime knows."""
    try:
        from ..models.gpt import GPT
    except ImportError:
        return {}
    return {GPT: export_gpt}


def export_gpt(conv, node, model) -> None:
    raise NotImplementedError
