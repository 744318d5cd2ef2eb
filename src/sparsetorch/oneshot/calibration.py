"""Calibration data for one-shot pruning: checked up front, then run through the model one item at a time.

Items are token-id tensors ``[seq]``/``[batch, seq]``, dicts of them with an optional ``attention_mask``,
or for a plain module whatever its forward takes. Each language-model item carries its token mask (the
``attention_mask``, or all ones) so that padded positions never enter the layer statistics.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.distributed import rank_and_world
from ..errors import SparsityError
from .blocks import to_device


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return emb if isinstance(emb, nn.Embedding) else None


def check_ids(ids: Any, vocab: int, i: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise SparsityError(f"calibration item {i}: expected a tensor of token ids, got {type(ids).__name__}",
                            item=i)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SparsityError(f"calibration item {i}: token ids must be an integer tensor, got {ids.dtype}; "
                            "tokenize the text (or use .long())", item=i, dtype=str(ids.dtype))
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise SparsityError(f"calibration item {i}: token ids must have shape [seq] or [batch, seq] with at least "
                            f"one token, got {tuple(ids.shape)}", item=i, shape=tuple(ids.shape))
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SparsityError(f"calibration item {i}: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                            f"got [{int(ids.min())}, {int(ids.max())}]", item=i)
    return ids.long() if ids.dim() == 2 else ids.long()[None, :]


def check_attention_mask(mask: Any, ids: torch.Tensor, i: int) -> torch.Tensor:
    """The ``attention_mask`` of item ``i`` as a bool ``[batch, seq]`` tensor (True = a real token)."""
    if not isinstance(mask, torch.Tensor):
        raise SparsityError(f"calibration item {i}: attention_mask must be a tensor, got {type(mask).__name__}", item=i)
    mask = mask if mask.dim() == 2 else mask[None, :]
    if tuple(mask.shape) != tuple(ids.shape):
        raise SparsityError(f"calibration item {i}: attention_mask has shape {tuple(mask.shape)} but input_ids has "
                            f"{tuple(ids.shape)}; they must match", item=i)
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise SparsityError(f"calibration item {i}: attention_mask must hold 0/1 (or bool) values", item=i)
    if not bool(mask.any()):
        raise SparsityError(f"calibration item {i}: attention_mask masks out every token", item=i)
    return mask.bool()


class Calibration:
    """The checked calibration items, how to run one through the model, and each item's token mask
    (``[batch, seq]`` bool, None for plain modules) so that padding never enters the statistics."""

    def __init__(self, samples: list, run, token_masks: list[torch.Tensor | None]) -> None:
        self.samples, self.run, self.token_masks = samples, run, token_masks

    def __len__(self) -> int:
        return len(self.samples)


def _as_list(calibration) -> list:
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise SparsityError("calibration must be an iterable of model inputs (token-id tensors or dicts of them)")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() <= 1 else list(calibration)
    try:
        samples = list(calibration)
    except TypeError:
        raise SparsityError(f"calibration must be an iterable of model inputs, got "
                            f"{type(calibration).__name__}") from None
    if not samples:
        raise SparsityError("calibration is empty; pass at least one input (e.g. 128 sequences of 512 tokens)")
    return samples


def shard_calibration(calibration, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``calibration`` for ``prune_oneshot`` under torchrun: the contiguous slice
    ``items[rank * n // world_size : (rank + 1) * n // world_size]`` (shares differ by at most one item), so
    that the ranks together cover every item exactly once. ``rank``/``world_size`` default to the
    torch.distributed run's (one process: the whole list). Items may hold different numbers of tokens:
    the statistics are pooled as sums over tokens, so uneven shards weigh correctly.

        calib = sparsetorch.oneshot.shard_calibration(all_items)   # on every rank, the same all_items
        sparsetorch.sparsegpt(model, calib, sparsity=0.5)           # every rank ends with the same model
    """
    samples = _as_list(calibration)
    here, world = rank_and_world()
    rank = here if rank is None else rank
    world = world if world_size is None else world_size
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise SparsityError(f"shard_calibration needs 0 <= rank < world_size, got rank={rank!r}, "
                            f"world_size={world!r}", rank=rank, world_size=world)
    if len(samples) < world:
        raise SparsityError(f"calibration has {len(samples)} items for {world} ranks; every rank needs at least one "
                            "(pass more items, or split the batches into more items)", items=len(samples),
                            world_size=world)
    n = len(samples)
    return samples[rank * n // world:(rank + 1) * n // world]


def prepare_calibration(model: nn.Module, calibration, device: torch.device | None = None) -> Calibration:
    """Check every calibration item before anything runs (a bad item never leaves a half-pruned model).
    Items are moved to ``device`` when run (default: where the model's first parameter is)."""
    samples = _as_list(calibration)
    param = next(model.parameters(), None)
    home = device if device is not None else param.device if param is not None else torch.device("cpu")
    emb = input_embedding(model)
    if emb is None:
        return _plain_calibration(model, samples, home)
    params = inspect.signature(model.forward).parameters
    hf_style = "input_ids" in params  # transformers: keyword inputs, no KV cache while calibrating
    extra = {"use_cache": False} if "use_cache" in params or hf_style and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
    prepared, masks = [], []
    for i, s in enumerate(samples):
        if isinstance(s, Mapping):
            if "input_ids" not in s:
                raise SparsityError(f"calibration item {i}: a dict needs 'input_ids', got keys {sorted(s)}", item=i)
            ids = check_ids(s["input_ids"], emb.num_embeddings, i)
            mask = s.get("attention_mask")
            mask = None if mask is None else check_attention_mask(mask, ids, i)
            item = {**s, "input_ids": ids}
            if mask is not None:
                item["attention_mask"] = mask.to(s["attention_mask"].dtype).reshape(ids.shape)
            prepared.append(item)
        else:
            ids, mask = check_ids(s, emb.num_embeddings, i), None
            prepared.append({"input_ids": ids} if hf_style else ids)
        masks.append(mask)

    def run_lm(sample):
        sample = to_device(sample, home)
        return model(**sample, **extra) if isinstance(sample, Mapping) else model(sample)

    return Calibration(prepared, run_lm, masks)


def _plain_calibration(model: nn.Module, samples: list, home: torch.device) -> Calibration:
    for i, s in enumerate(samples):
        if not isinstance(s, (torch.Tensor, tuple, list, Mapping)):
            raise SparsityError(f"calibration item {i}: expected a tensor, tuple or dict of model inputs, got "
                                f"{type(s).__name__}", item=i)

    def run_plain(sample):
        sample = to_device(sample, home)
        if isinstance(sample, Mapping):
            return model(**sample)
        return model(*sample) if isinstance(sample, (tuple, list)) else model(sample)

    return Calibration(samples, run_plain, [None] * len(samples))
