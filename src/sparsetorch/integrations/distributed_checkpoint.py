"""Sharded checkpoints of sparse training through ``torch.distributed.checkpoint`` (DCP), for FSDP2.

``save_distributed_state(model, folder, optimizer, sparsifier)`` writes one DCP checkpoint: the model and
optimizer state from ``torch.distributed.checkpoint.state_dict.get_state_dict`` (each rank writes its
shards), the sparsifier's masks (DTensors under FSDP2: sharded like the weights) and its other tensors
(generator state), the model's other masks (e.g. from ``sparsetorch.prune``, kept while fine-tuning without
a sparsifier), and the sparsifier's plain data (step, history) plus ``extra`` as JSON in a uint8 tensor,
so no value of ours goes through DCP's pickled objects. DCP reshards on load: a checkpoint written by 2
FSDP2 ranks loads on 1 process into a plain model (zeros in place, masks restored) or on any other world size.
Resuming on the same world size continues the run bitwise.

The folder is written as ``<folder>.partial`` and renamed once every rank has finished, so a folder under
the final name is always a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SparsityError
from ..core.masks import iter_masks, set_mask
from .training_state import decode_state, encode_state, inner_optimizer, unwrap_model

__all__ = ["save_distributed_state", "load_distributed_state"]

_JSON = "sparsetorch_json"
_TENSORS = "sparsetorch_tensors"
_MASKS = "sparsetorch_masks"
_VERSION = 1


def save_distributed_state(model: nn.Module, path: str | os.PathLike, optimizer: Any = None, sparsifier: Any = None,
                           *, extra: dict[str, Any] | None = None) -> Path:
    """Write a DCP checkpoint of ``model`` (FSDP2 or plain), ``optimizer``, ``sparsifier`` and ``extra`` to the
    folder ``path``; every rank calls it. Returns the folder."""
    import torch.distributed.checkpoint as dcp

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SparsityError(f"{folder} is a file; save_distributed_state writes a folder")
    plain: dict[str, Any] = {"version": _VERSION, "extra": dict(extra or {})}
    tensors: dict[str, torch.Tensor] = {}
    if sparsifier is not None:
        plain["sparsifier"] = sparsifier.state_dict()
    body = encode_state(plain, tensors)  # before any write: an unsavable value leaves nothing behind
    state = _model_state(model, optimizer)
    state[_JSON] = torch.frombuffer(bytearray(json.dumps(body).encode()), dtype=torch.uint8)
    state[_TENSORS] = tensors
    state[_MASKS] = _other_masks(model, sparsifier)
    partial = folder.with_name(folder.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    dcp.save(state, checkpoint_id=str(partial))
    _barrier()
    if _rank() == 0:
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def load_distributed_state(model: nn.Module, path: str | os.PathLike, optimizer: Any = None,
                           sparsifier: Any = None) -> dict[str, Any]:
    """Restore what ``save_distributed_state`` wrote into freshly built objects on any world size; returns its
    ``extra``. Build model (``fully_shard`` it or not), optimizer and sparsifier as for the original run; an
    unattached sparsifier is attached here, once everything is read. Every rank calls it.

    All or nothing: the checkpoint is first read into new tensors placed like the model's (each rank its
    shards, so this costs one more copy of this rank's model and optimizer state while it loads), and only
    once all of it was read are they copied into the model, optimizer and sparsifier. A checkpoint that does
    not fit, or a shard that is missing or damaged, is a ``SparsityError`` that leaves the model's weights and
    masks and the sparsifier as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    folder = Path(path)
    if not (folder / ".metadata").is_file():
        raise SparsityError(f"no complete DCP checkpoint at {folder} (no .metadata); pass the folder "
                            "save_distributed_state wrote")
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if _JSON not in saved:
        raise SparsityError(f"{folder} is a DCP checkpoint but not one written by save_distributed_state")
    header = torch.empty(saved[_JSON].size, dtype=torch.uint8)
    _read({_JSON: header}, folder)
    body = json.loads(bytes(header.tolist()).decode())
    if optimizer is not None and not any(k.startswith("optimizer.") for k in saved):
        raise SparsityError(f"{folder} holds no optimizer state; it was saved without one")
    _check_model_fits(saved, _model_state(model, None)["model"], folder)
    masks = _mask_slots(saved, model, folder)
    if sparsifier is not None:
        _check_sparsifier_saved(body, folder)
        _check_masks_fit(saved, model, sparsifier, folder)  # before attaching, which zeroes weights
    state = _model_state(model, optimizer)
    state[_TENSORS] = _tensor_slots(saved, sparsifier, model)
    state[_MASKS] = {name: mask for name, (_, _, mask) in masks.items()}
    state = _fresh(state)  # a load that fails midway must not leave the live objects half-loaded
    _read(state, folder)
    if sparsifier is not None and sparsifier.model is None:
        sparsifier.attach(unwrap_model(model), optimizer)
    if optimizer is not None:
        set_state_dict(unwrap_model(model), inner_optimizer(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(unwrap_model(model), state["model"])
    plain = decode_state(body, state[_TENSORS])
    for qualified, (module, name, _) in masks.items():
        set_mask(module, state[_MASKS][qualified], name)  # what was read (the slots are copies)
    if sparsifier is not None:
        sparsifier.load_state_dict(plain["sparsifier"])
    return plain["extra"]


def _model_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model = unwrap_model(model)
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, inner_optimizer(optimizer))
    return {"model": model_state, "optimizer": optim_state}


def _other_masks(model: nn.Module, sparsifier: Any) -> dict[str, torch.Tensor]:
    """The model's masks the sparsifier does not own (its own travel in its state)."""
    owned = {t.qualified_name for t in sparsifier.targets} if sparsifier is not None else set()
    return {item.qualified_name: item.mask for item in iter_masks(unwrap_model(model))
            if item.qualified_name not in owned}


def _mask_slots(saved: dict[str, Any], model: nn.Module, folder: Path) -> dict[str, tuple]:
    """``{qualified name: (module, parameter name, slot)}`` for the saved model masks, each slot placed like its
    parameter (a DTensor shard under FSDP2); checked before anything is loaded."""
    prefix = _MASKS + "."
    slots = {}
    for fqn, meta in saved.items():
        if not fqn.startswith(prefix):
            continue
        qualified = fqn[len(prefix):]
        path, _, name = qualified.rpartition(".")
        try:
            module = unwrap_model(model).get_submodule(path)
        except AttributeError:
            module = None
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or tuple(param.shape) != tuple(meta.size):
            raise SparsityError(f"{folder} holds a mask for {qualified} of shape {tuple(meta.size)}, which the model "
                                "has no parameter to match; build the model as for the saved run")
        slots[qualified] = (module, name, torch.zeros_like(param, dtype=torch.bool))
    return slots


def _fresh(state: Any) -> Any:
    """``state`` with every tensor replaced by a new one of its shape, dtype and placement (``empty_like``: a
    DTensor stays sharded like the original) and every container copied: what DCP loads into first."""
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    if isinstance(state, dict):
        return {k: _fresh(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_fresh(v) for v in state)
    return state


def _read(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load`` of ``state`` (new tensors only) from ``folder``; an unreadable shard is a ``SparsityError``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: the ranks' errors

    try:
        dcp.load(state, checkpoint_id=str(folder))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - many types for an unreadable file
        raise SparsityError(f"{folder} could not be read ({type(exc).__name__}: {_first_line(exc)}); a shard is "
                            "missing or damaged: copy the whole checkpoint folder again. Nothing was loaded: the "
                            "model, its masks and the sparsifier are as they were", path=str(folder)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _tensor_slots(saved: dict[str, Any], sparsifier: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Where DCP loads our tensors: the sparsifier's masks placed like their parameters (DTensors under FSDP2, so
    each rank reads its shard), whether it is attached yet or not, and, for the rest (generator state,
    extra), tensors of the saved size and dtype."""
    current: dict[str, torch.Tensor] = {}
    if sparsifier is not None and sparsifier.model is not None:
        encode_state({"sparsifier": {"masks": sparsifier.state_dict()["masks"]}}, current)
    elif sparsifier is not None:  # attached only once the load succeeded: slots like the masks it will hold
        from ..core.layer_selection import select_targets

        targets = select_targets(unwrap_model(model), sparsifier.include, sparsifier.exclude)
        encode_state({"sparsifier": {"masks": {t.qualified_name: torch.zeros_like(t.param, dtype=torch.bool)
                                               for t in targets}}}, current)
    prefix = _TENSORS + "."
    slots = {}
    for fqn, meta in saved.items():
        if not fqn.startswith(prefix):
            continue
        key = fqn[len(prefix):]
        size = getattr(meta, "size", None)
        if key in current and tuple(current[key].shape) == tuple(size):
            slots[key] = current[key]
        elif key in current:
            raise SparsityError(f"the checkpoint's {key} has shape {tuple(size)}, the model's {tuple(current[key].shape)}; "
                                "build the model as for the saved run")
        else:
            slots[key] = torch.empty(tuple(size), dtype=meta.properties.dtype)
    return slots


def _check_model_fits(saved: dict[str, Any], model_state: dict[str, Any], folder: Path) -> None:
    """Every model tensor in the checkpoint with the model's (global) shape, before anything is loaded."""
    wrong = []
    for fqn, value in model_state.items():
        meta = saved.get(f"model.{fqn}")
        if meta is None or tuple(getattr(meta, "size", ())) != tuple(value.shape):
            wrong.append(f"{fqn}: checkpoint {None if meta is None else tuple(meta.size)}, model {tuple(value.shape)}")
    if wrong:
        raise SparsityError(f"{folder} does not fit the model ({len(wrong)} tensors: {'; '.join(wrong[:3])}); build "
                            "the model as for the saved run", mismatched=len(wrong))


def _check_masks_fit(saved: dict[str, Any], model: nn.Module, sparsifier: Any, folder: Path) -> None:
    from ..core.layer_selection import select_targets

    targets = sparsifier.targets if sparsifier.model is not None else \
        select_targets(unwrap_model(model), sparsifier.include, sparsifier.exclude)
    prefix = f"{_TENSORS}./sparsifier/masks/"
    have = {k[len(prefix):]: tuple(v.size) for k, v in saved.items() if k.startswith(prefix)}
    want = {t.qualified_name: tuple(t.param.shape) for t in targets}
    if have != want:
        raise SparsityError(
            f"the sparsifier state in {folder} does not match the layers it would prune: missing "
            f"{sorted(set(want) - set(have))[:5]}, unexpected {sorted(set(have) - set(want))[:5]}, other shape "
            f"{sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]}; create the sparsifier with the "
            "saved run's include/exclude")


def _check_sparsifier_saved(body: Any, folder: Path) -> None:
    items = body.get("items", []) if isinstance(body, dict) else []
    if not any(isinstance(i, list) and i and i[0] == "sparsifier" for i in items):
        raise SparsityError(f"{folder} holds no sparsifier state; it was saved without one")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
