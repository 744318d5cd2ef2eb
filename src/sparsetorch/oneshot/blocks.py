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
    modules that each contain Linear layers (GPT-2 ``transformer.h``, OPT/Llama ``...layers``),
    not counting lists nested inside another such list's blocks (the per-expert MLPs of an MoE
    layer outnumber the decoder layers of a small model but are not the model's blocks)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        child = module[0]
        if len(kinds) != 1 or is_linear_like(child) or not any(is_linear_like(m) for m in child.modules()):
            continue
        found.append((name, module))
    outer = [(n, m) for n, m in found if not any(n.startswith(f"{o}.") for o, _ in found if o != n)]
    best = None
    for name, module in outer:
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


def same_argument(a: Any, b: Any) -> bool:
    """Whether two blocks were handed the same argument: the same tensor object (a model that builds
    one attention mask or rotary table and passes it to every layer), recursively inside containers,
    or equal plain values. Equal-valued but distinct tensors count as different: a sliding-window mask
    can equal the full one on a short sample and not on a longer one."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_argument(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_argument(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a usable ==
        return False


def _same_call(a: BlockCall, b: BlockCall) -> bool:
    return a.key == b.key and same_argument(a.args, b.args) and same_argument(a.kwargs, b.kwargs)


def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, run_model: Callable[[Any], Any],
                        samples: list) -> list[list[BlockCall]]:
    """How each block is called for each sample: ``calls[block][sample]`` (only block 0's calls keep
    their hidden states; the sequential driver feeds later blocks the pruned outputs instead).

    Most models pass every layer the same mask and position embeddings; then only block 0 is reached
    (each sample stops there) and its calls serve every block. Models whose layers differ (Gemma 2/3
    and Qwen2 alternate sliding-window and full attention, Gemma 3 also local and global rotary
    tables) are detected on the first sample and then run through all their blocks, dense, once per
    sample, so that each block is replayed with its own arguments."""
    first = _capture_all(blocks, run_model, samples[0])
    if all(_same_call(c, first[0]) for c in first[1:]):
        rest = capture_first_block(model, blocks[0], run_model, samples[1:]) if len(samples) > 1 else []
        return [[first[0], *rest]] * len(blocks)
    per_sample = [first] + [_capture_all(blocks, run_model, s) for s in samples[1:]]
    return [[calls[i] for calls in per_sample] for i in range(len(blocks))]


def _capture_all(blocks: nn.ModuleList, run_model: Callable[[Any], Any], sample: Any) -> list[BlockCall]:
    """Run ``sample`` through the (dense) model up to the end of its last block, recording every block's call."""
    calls: list[BlockCall] = []

    def pre(_module, args, kwargs):
        calls.append(BlockCall(args, kwargs))
        if len(calls) > 1:
            calls[-1].hidden = None  # later blocks get the pruned outputs of the block before them

    def post(_module, _args, _kwargs, _output):
        raise _Stop

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            run_model(sample)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(blocks):
        raise SparsityError(f"the model's forward called its {len(blocks)} blocks {len(calls)} times for one sample; "
                            "block-by-block pruning needs each block called once")
    return calls


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
    i.e. running block by block reproduces the model (checked on the dense model before pruning). Checked as
    the blocks run, holding one output at a time (a deep model's every activation would not fit)."""
    state = {"calls": 0, "outs": 0, "chained": True, "last": None}

    def pre(_m, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if state["calls"] > 0:
            last = state["last"]
            state["chained"] &= isinstance(hidden, torch.Tensor) and isinstance(last, torch.Tensor) and \
                hidden.shape == last.shape and torch.equal(hidden, last)
        state["calls"] += 1

    def post(module, _args, _kwargs, output):
        state["last"] = first_tensor(output)
        state["outs"] += 1
        if module is blocks[-1]:
            raise _Stop  # the head is not needed (and out of core, not loaded)

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            run_model(sample)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return state["calls"] == len(blocks) and state["outs"] == len(blocks) and state["chained"]
