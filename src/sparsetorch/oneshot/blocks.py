"""Running a transformer block by block: find the decoder layers, capture the inputs of the first
one, then feed each block the outputs of the (already pruned) block before it."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import SparsityError
from .linear_layers import is_linear_like


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at block 0."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of repeated blocks: the longest ModuleList of same-class, non-Linear
    modules that each contain Linear layers (GPT-2 ``transformer.h``, OPT/Llama ``...layers``)."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        child = module[0]
        if len(kinds) != 1 or is_linear_like(child) or not any(is_linear_like(m) for m in child.modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def to_device(value: Any, device: torch.device) -> Any:
    """Move the tensors inside nested tuples/lists/dicts to ``device`` (other objects unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def first_tensor(output: Any) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself or the first item of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return next(iter(output.values()))
    raise SparsityError(f"cannot find the hidden states in a block output of type {type(output).__name__}; "
                        "blocks must return a tensor, a tuple/list starting with it, or a ModelOutput")


class BlockCall:
    """One calibration sample's call of a block: the hidden states plus the other arguments
    the model passed (attention mask, rotary position embeddings, position ids...)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        if args:
            self.hidden, self.args, self.kwargs = args[0], tuple(args[1:]), dict(kwargs)
            self.key = None
        else:
            self.kwargs = dict(kwargs)
            self.hidden, self.args, self.key = self.kwargs.pop("hidden_states"), (), "hidden_states"

    def run(self, block: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        args, kwargs = to_device(self.args, device), to_device(self.kwargs, device)
        if self.key is None:
            return first_tensor(block(hidden, *args, **kwargs))
        return first_tensor(block(**{self.key: hidden}, **kwargs))


def capture_first_block(model: nn.Module, block: nn.Module, run_model: Callable[[Any], Any],
                        samples: list) -> list[BlockCall]:
    """Run each sample until it reaches ``block`` and record how the block was called."""
    calls: list[BlockCall] = []

    def hook(_module, args, kwargs):
        calls.append(BlockCall(args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            try:
                run_model(sample)
            except _Stop:
                continue
            raise SparsityError("the model's forward never reached its first block; check that the calibration "
                                "samples are inputs the model accepts and that find_blocks picked its decoder layers")
    finally:
        handle.remove()
    return calls


def blocks_chain(model: nn.Module, blocks: nn.ModuleList, run_model: Callable[[Any], Any], sample: Any) -> bool:
    """True if, for ``sample``, each block's hidden-state input is exactly the previous block's output,
    i.e. running block by block reproduces the model (checked on the dense model before pruning)."""
    seen_in: list[torch.Tensor] = []
    seen_out: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        seen_in.append(args[0] if args else kwargs.get("hidden_states"))

    def post(_m, _args, _kwargs, output):
        seen_out.append(first_tensor(output))

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            run_model(sample)
    finally:
        for h in handles:
            h.remove()
    if len(seen_in) != len(blocks) or len(seen_out) != len(blocks):
        return False
    return all(isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
               for a, b in zip(seen_in[1:], seen_out[:-1]))
