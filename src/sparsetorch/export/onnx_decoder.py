"""``DecoderLogits``: a transformers causal LM as ``ids -> logits``, the form ``export_onnx`` can trace.

A transformers decoder returns a ModelOutput with a KV cache object; the TorchScript exporter needs tensors in and
out. Three things in transformers' forward would otherwise break the export or, worse, the exported graph:

- without an attention mask, transformers looks for packed sequences in the position ids with ``torch.diff``,
  which has no ONNX operator: the wrapper passes an all-ones mask (or the one given);
- mixture-of-experts blocks: the default "grouped_mm" experts use ``torch.histc`` (no ONNX operator either), and
  the "eager" loop runs only the experts that the example's tokens were routed to, so a traced graph would hold
  those experts only and silently compute wrong outputs for other tokens. The wrapper switches the model to
  "batched_mm" (every token gathers its experts' weights: no data-dependent control flow) while it is wrapped;
  :meth:`DecoderLogits.unwrap` gives the model back with its own implementation;
- ``use_cache=False``: no cache is built or returned.

Shrunk models (fewer blocks, heads, MLP neurons, hidden channels or experts, per-block widths from
``sparsetorch.shrink.from_pretrained``) export the same way: every projection reads its size from its weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparsityError

__all__ = ["DecoderLogits"]

TRACEABLE_EXPERTS = "batched_mm"


class DecoderLogits(nn.Module):
    """``DecoderLogits(causal_lm)(ids [B, T], attention_mask [B, T] = None) -> logits [B, T, vocab]``.

    Example::

        sparsetorch.export_onnx(DecoderLogits(model), ids, "small.onnx", dynamic_sequence=True)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "get_input_embeddings", None)):
            raise SparsityError(f"DecoderLogits wraps a transformers causal LM (a model with .config and input "
                                f"embeddings); got {type(model).__name__}. Export other models directly")
        self.model = model
        self._experts = None
        if isinstance(getattr(config, "_experts_implementation", None), str) and \
                callable(getattr(model, "set_experts_implementation", None)):
            self._experts = model.get_experts_implementation()
            model.set_experts_implementation(TRACEABLE_EXPERTS)
        self.training = model.training  # not .train(): that would reset every submodule's own flag

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def unwrap(self) -> nn.Module:
        """The wrapped model, with the experts implementation it had before."""
        if self._experts is not None:
            self.model.set_experts_implementation(self._experts)
        return self.model
