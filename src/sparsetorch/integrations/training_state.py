"""Save and resume a sparse training run without pickle: model, masks, optimizer, sparsifier.

A training state is a folder of two safetensors files::

    run/model.safetensors   weights and masks (``sparsetorch.save``; loads alone with ``sparsetorch.load``)
    run/state.safetensors   optimizer, sparsifier and ``extra`` tensors, with their plain data
                            (step counts, learning rates, history) as JSON in the file header

Each file is written atomically; ``state.safetensors`` is written last and records the SHA-256
of the model file, so a save interrupted between the two files is detected at load time
instead of silently resuming from a mismatched pair.

Resuming from it continues the run bitwise: the same masks and weights as a run that never
stopped (given the same data order; put RNG states you rely on in ``extra``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.distributed import is_sharded
from ..core.rollback import rollback
from ..errors import SparsityError
from ..formats.safetensors_file import read_safetensors, write_safetensors
from ..formats.files import load as _load_model
from ..formats.files import save as _save_model

__all__ = ["save_training_state", "load_training_state", "save_sparsifier_state", "load_sparsifier_state",
           "unwrap_model", "encode_state", "decode_state"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
_META_KEY = "sparsetorch.training_state"
_VERSION = 1


# ---- nested state <-> (JSON, tensors) -------------------------------------------------------
# Plain values stay as they are; every other node is a tagged JSON object, so a user dict can
# never be mistaken for a tag: {"t": "tensor"|"tuple"|"dict", ...}.

def encode_state(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """``obj`` as JSON-able data; its tensors go into ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"t": "tensor", "key": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"t": "tuple", "items": [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise SparsityError(f"cannot save a dict key of type {type(k).__name__} at {key or '/'}; "
                                    "training state keys must be str/int/float/bool")
            items.append([k, encode_state(v, tensors, f"{key}/{k}")])
        return {"t": "dict", "items": items}
    raise SparsityError(
        f"cannot save a {type(obj).__name__} at {key or '/'}: training state must hold only tensors and "
        "plain data (None, bool, int, float, str, list, tuple, dict); convert it (e.g. float(x)) first",
        key=key,
    )


def decode_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(data, list):
        return [decode_state(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get("t")
    if tag == "tensor":
        if data.get("key") not in tensors:
            raise SparsityError(f"training state refers to a missing tensor {data.get('key')!r}; it is corrupted")
        return tensors[data["key"]]
    if tag == "tuple":
        if not isinstance(data.get("items"), list):
            raise SparsityError("training state holds a corrupted tuple; it is corrupted")
        return tuple(decode_state(v, tensors) for v in data["items"])
    if tag == "dict":
        items = data.get("items")
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 and
                                                  (i[0] is None or isinstance(i[0], (bool, int, float, str)))
                                                  for i in items):
            raise SparsityError("training state holds a corrupted mapping (keys must be str/int/float/bool); "
                                "it is corrupted")
        return {k: decode_state(v, tensors) for k, v in items}
    raise SparsityError(f"training state holds an unknown entry {data!r}; it is corrupted")


def _write(path: Path, sections: dict[str, Any], info: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    body = {name: encode_state(value, tensors, name) for name, value in sections.items()}
    seen: set[int] = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = value.clone()
        seen.add(ptr)
    header = {"version": _VERSION, **info, "sections": body}
    return write_safetensors(path, tensors, _META_KEY, header)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, decoded sections)`` of a state file, or SparsityError."""
    if not path.is_file():
        raise SparsityError(f"no training state at {path}; pass the folder save_training_state wrote")
    header, tensors = read_safetensors(path, _META_KEY, newest_version=_VERSION,
                                       written_by="sparsetorch.save_training_state")
    if not isinstance(header.get("sections", {}), dict):
        raise SparsityError(f"{path} has a corrupted header (sections); the file is damaged")
    sections = {name: decode_state(value, tensors) for name, value in header.get("sections", {}).items()}
    return header, sections


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---- the public pair ----------------------------------------------------------------------------

def model_first(model, path, fn: str):
    """``(model, path)``; the old ``(path, model)`` order is swapped with a DeprecationWarning."""
    if isinstance(model, (str, os.PathLike)) and isinstance(path, nn.Module):
        import warnings

        warnings.warn(f"{fn}(path, model, ...) is deprecated; call {fn}(model, path, ...) like save(model, path)",
                      DeprecationWarning, stacklevel=3)
        return path, model
    return model, path


def save_training_state(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    sparsifier: Any = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to resume sparse training into the folder ``path``; returns it.

    ``extra`` holds anything else to resume with (epoch, LR-scheduler ``state_dict()``,
    ``torch.get_rng_state()``): tensors and plain data only. The old order ``(path, model)``
    still works with a DeprecationWarning.
    """
    model, path = model_first(model, path, "save_training_state")
    check_not_sharded(model, "save_training_state")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SparsityError(f"{folder} is a file; save_training_state writes a folder")
    sections: dict[str, Any] = {"extra": dict(extra or {})}
    if optimizer is not None:
        sections["optimizer"] = inner_optimizer(optimizer).state_dict()
    if sparsifier is not None:
        sections["sparsifier"] = sparsifier.state_dict()
    # encode before touching the disk: an unsavable value must not leave a half-written folder
    encode_state(sections, {})
    model_path = _save_model(unwrap_model(model), folder / MODEL_FILE)
    return _write(folder / STATE_FILE, sections, {"model_sha256": _sha256(model_path)}).parent


def load_training_state(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    sparsifier: Any = None,
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote into fresh objects; returns its ``extra``.

    Build the model and optimizer as for the original run and create the sparsifier with the
    same arguments; an unattached sparsifier is attached here, before the weights are loaded
    (attaching installs the initial masks, which would otherwise zero loaded weights).
    The old order ``(path, model)`` still works with a DeprecationWarning.
    """
    model, path = model_first(model, path, "load_training_state")
    check_not_sharded(model, "load_training_state")
    folder = Path(path)
    header, sections = _read(folder / STATE_FILE)
    model_path = folder / MODEL_FILE
    if not model_path.is_file() or _sha256(model_path) != header.get("model_sha256"):
        raise SparsityError(f"{model_path} does not belong to {folder / STATE_FILE} (a save was interrupted "
                            "or the files were mixed); resume from an earlier checkpoint")
    for name, given in (("optimizer", optimizer), ("sparsifier", sparsifier)):
        if given is not None and name not in sections:
            raise SparsityError(f"{folder} holds no {name} state; it was saved without one")
    model, inner = unwrap_model(model), inner_optimizer(optimizer) if optimizer is not None else None
    if inner is not None:
        check_optimizer_state(inner, sections["optimizer"], folder)
    # all or nothing: any failure below puts model, optimizer and sparsifier back (attachment included)
    with rollback(model, inner, sparsifier, what=f"loading the training state {folder}"):
        if sparsifier is not None and sparsifier.model is None:
            sparsifier.attach(model, optimizer)
        _load_model(model, model_path)
        if inner is not None:
            inner.load_state_dict(sections["optimizer"])
        if sparsifier is not None:
            sparsifier.load_state_dict(sections["sparsifier"])
    return sections["extra"]


def check_not_sharded(model: nn.Module, fn: str) -> None:
    """One safetensors file holds whole tensors: an FSDP2 model checkpoints through torch.distributed.checkpoint."""
    if any(is_sharded(p) for p in model.parameters()):
        raise SparsityError(f"{fn} writes whole tensors from one process; the model is sharded by FSDP2 "
                            "(fully_shard): use sparsetorch.integrations.save_distributed_state / "
                            "load_distributed_state, which every rank calls")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, folder: Path) -> None:
    """A saved optimizer state_dict must fit ``optimizer``: the same number of parameter groups, each with as
    many parameters, ids that index them, per-parameter state as mappings."""
    fix = f"{folder} is corrupted, or the optimizer was built differently (same param groups, same order)"
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise SparsityError(f"the saved optimizer state has no param_groups/state; {fix}")
    if len(groups) != len(optimizer.param_groups):
        raise SparsityError(f"the saved optimizer has {len(groups)} parameter groups, the given one "
                            f"{len(optimizer.param_groups)}; {fix}")
    ids: set = set()
    for i, (saved, given) in enumerate(zip(groups, optimizer.param_groups)):
        params = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(params, list) or len(params) != len(given["params"]):
            raise SparsityError(f"the saved optimizer's parameter group {i} holds "
                                f"{len(params) if isinstance(params, list) else params!r} parameters, the given one "
                                f"{len(given['params'])}; {fix}")
        ids.update(p if isinstance(p, (int, str)) and not isinstance(p, bool) else None for p in params)
    if None in ids or len(ids) != sum(len(g["params"]) for g in optimizer.param_groups):
        raise SparsityError(f"the saved optimizer's parameter ids are not distinct integers; {fix}")
    for key, value in state["state"].items():
        if key not in ids or not isinstance(value, dict):
            raise SparsityError(f"the saved optimizer state has an entry {key!r} for no parameter; {fix}")


def save_sparsifier_state(path: str | os.PathLike, sparsifier: Any) -> Path:
    """Write only ``sparsifier.state_dict()`` (one safetensors file), e.g. next to a framework checkpoint."""
    state = sparsifier.state_dict()
    if any(is_sharded(m) for m in state.get("masks", {}).values()):
        raise SparsityError("the sparsifier's masks are sharded by FSDP2 (fully_shard); one safetensors file holds "
                            "whole tensors: use sparsetorch.integrations.save_distributed_state, which every rank calls")
    return _write(Path(path), {"sparsifier": state}, {})


def load_sparsifier_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read what ``save_sparsifier_state`` wrote, as a state dict for ``Sparsifier.load_state_dict``."""
    _, sections = _read(Path(path))
    if "sparsifier" not in sections:
        raise SparsityError(f"{path} holds no sparsifier state")
    return sections["sparsifier"]


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def resume_sparsifier(sparsifier: Any, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load ``state`` into ``sparsifier`` after a framework already restored model and optimizer.

    Attaching installs the method's initial masks, which zeroes weights and optimizer state
    the framework just loaded; so a not-yet-attached sparsifier is attached with those tensors
    saved aside and put back once the checkpoint's masks are in place.
    """
    optimizer = inner_optimizer(optimizer)
    if sparsifier.model is not None:
        sparsifier.load_state_dict(state)
        return
    from ..core.layer_selection import select_targets

    params = [t.param for t in select_targets(model, sparsifier.include, sparsifier.exclude)]
    saved = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                   if isinstance(v, torch.Tensor)}) for p in params]
    sparsifier.attach(model, optimizer)
    if {id(p) for p in sparsifier.params} - {id(p) for p in params}:
        raise SparsityError(f"{type(sparsifier).__name__} chose layers other than its include/exclude select; "
                            "attach it before the framework loads the checkpoint")
    sparsifier.load_state_dict(state)
    with torch.no_grad():
        for p, (weight, opt_state) in zip(params, saved):
            p.copy_(weight)
            for key, value in opt_state.items():
                optimizer.state[p][key].copy_(value)
    from ..core.masks import apply_masks

    apply_masks(model)  # a no-op for a consistent checkpoint
