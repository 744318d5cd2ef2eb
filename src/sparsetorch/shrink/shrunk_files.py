"""Save and load shrunk models as tensors plus their new shapes: no pickled modules.

The file is safetensors: the plain state_dict, and in its JSON metadata every tensor's shape,
the layers' size attributes (``in_features``, ``num_heads``...) and the changed config keys.
``load_shrunk`` builds the original architecture with ``model_factory`` and resizes it.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as _st_save
from torch import nn

from ..core.masks import remove_masks
from ..errors import SparsityError
from ..formats.atomic import atomic_write
from ..formats.safetensors_file import read_safetensors
from .groups import HEAD_ATTRS, adapter_for

__all__ = ["save_shrunk", "load_shrunk"]

_KEY = "sparsetorch_shrunk"
_VERSION = 1
_CONFIG_KEYS = ("n_head", "n_inner", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


def _size_attrs(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for name, m in model.named_modules():
        adapter = adapter_for(m)
        names = (adapter.size_attrs if adapter else ()) + HEAD_ATTRS.get(type(m).__name__, ())
        values = {a: getattr(m, a) for a in names if isinstance(getattr(m, a, None), int)}
        if values:
            out[name] = values
    return out


def save_shrunk(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write a (shrunk) model's state_dict and shapes to ``path`` atomically; returns the path."""
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    tensors, shapes, storages = {}, {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in storages:
            value = value.clone()  # tied weights: safetensors wants separate copies
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
        shapes[key] = list(value.shape)
    config = getattr(model, "config", None)
    header = {
        "version": _VERSION, "shapes": shapes, "attrs": _size_attrs(model),
        "config": {k: getattr(config, k) for k in _CONFIG_KEYS if isinstance(getattr(config, k, None), int)},
        "user": metadata or {},
    }
    try:
        payload = _st_save(tensors, metadata={_KEY: json.dumps(header)})
    except TypeError as exc:
        raise SparsityError(f"metadata must be JSON-serializable: {exc}") from None
    return atomic_write(Path(path), payload)


def load_shrunk(path: str | os.PathLike, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by ``save_shrunk``: ``model_factory()`` makes the original
    architecture (e.g. ``lambda: ResNet()`` or ``lambda: GPT2LMHeadModel(config)``), whose
    layers are then resized to the recorded shapes and loaded."""
    header, state = _read(Path(path))
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise SparsityError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    remove_masks(model)  # a shrunk file holds no masks (shrink drops them); a masked factory's would be stale
    modules = dict(model.named_modules())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = [k for k in sorted(set(state) - set(expected)) if not _is_new_bias(k, modules)]
    if missing or unexpected:
        raise SparsityError(
            f"{path} does not match the model model_factory builds: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; pass a factory for the architecture that was shrunk",
            missing=missing, unexpected=unexpected,
        )
    for name in header["attrs"]:
        if name not in modules:
            raise SparsityError(f"{path} resizes layer {name!r}, which the model has not")
    _resize(model, modules, header, state)
    model.load_state_dict(state, strict=True)
    return model


def _is_new_bias(key: str, modules: dict[str, nn.Module]) -> bool:
    """A bias that shrink added to fold a removed channel's constant."""
    owner, _, name = key.rpartition(".")
    return name == "bias" and owner in modules and getattr(modules[owner], "bias", 0) is None


def _resize(model: nn.Module, modules: dict[str, nn.Module], header: dict, state: dict) -> None:
    replaced: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    current = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        old = current.get(key)
        if old is not None and tuple(old.shape) == tuple(value.shape):
            continue
        if old is None:  # a folded bias
            module.register_parameter(name, nn.Parameter(torch.empty(value.shape, dtype=value.dtype)))
            continue
        new = replaced.get(id(old))
        if new is None:
            data = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            new = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
            replaced[id(old)] = new
        if isinstance(new, nn.Parameter):
            module._parameters[name] = new
        else:
            module._buffers[name] = new
    for name, values in header["attrs"].items():
        _check_attrs(name, modules[name], values)
    for key, value in header["config"].items():
        _check_size(f"config key {key!r}", key, value, _CONFIG_KEYS)
    for name, values in header["attrs"].items():
        for attr, value in values.items():
            setattr(modules[name], attr, value)
    for module in modules.values():  # sizes the forward reads but that only the tensors record (hidden size)
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
    config = getattr(model, "config", None)
    for key, value in header["config"].items():
        if config is not None:
            setattr(config, key, value)


# -- the declared schema: only the size attributes save_shrunk writes, each a positive int matching the tensors
def _schema(module: nn.Module) -> tuple[str, ...]:
    """The attributes ``_size_attrs`` records for this module (and so the only ones a file may set)."""
    adapter = adapter_for(module)
    return (adapter.size_attrs if adapter else ()) + HEAD_ATTRS.get(type(module).__name__, ())


def _check_size(what: str, attr: object, value: object, allowed: tuple[str, ...]) -> None:
    if attr not in allowed:
        raise SparsityError(f"the file sets {what}, which save_shrunk never writes (allowed: {list(allowed)}); "
                            "the file is corrupted or was edited", attribute=str(attr))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2**40:
        raise SparsityError(f"the file sets {what} to {value!r}; it must be a positive integer (the file is "
                            "corrupted or was edited)", attribute=str(attr))


def _check_attrs(name: str, module: nn.Module, values: object) -> None:
    """The sizes a file gives layer ``name``: declared for its type, positive ints, equal to what its resized
    tensors imply (the adapter's ``fix_sizes`` on a shallow copy), and heads dividing the width."""
    if not isinstance(values, dict):
        raise SparsityError(f"the file's sizes for layer {name!r} are {type(values).__name__}, expected a mapping; "
                            "the file is corrupted")
    allowed = _schema(module)
    for attr, value in values.items():
        _check_size(f"attribute {attr!r} of layer {name!r}", attr, value, allowed)
    adapter = adapter_for(module)
    if adapter is not None:
        probe = copy.copy(module)  # own __dict__: fix_sizes writes the copy's ints, the module keeps its own
        adapter.fix_sizes(probe)
        for attr in adapter.size_attrs:
            if attr in values and getattr(probe, attr, None) != values[attr]:
                raise SparsityError(f"the file sets {attr}={values[attr]} on layer {name!r} but its tensors imply "
                                    f"{getattr(probe, attr, None)}; the file is corrupted", attribute=attr)
    heads, width = values.get("num_heads"), values.get("split_size")
    if heads is not None and width is not None and width % heads:
        raise SparsityError(f"the file gives layer {name!r} {heads} heads for width {width}, which they do not "
                            "divide; the file is corrupted", attribute="num_heads")
    qkv = getattr(module, "qkv", None)  # sparsetorch's GPT: q, k and v of every head in one Linear
    if "heads" in values and isinstance(qkv, nn.Linear) and qkv.weight.shape[0] % (3 * values["heads"]):
        raise SparsityError(f"the file gives layer {name!r} {values['heads']} heads for a qkv width of "
                            f"{qkv.weight.shape[0]}, which they do not split evenly; the file is corrupted",
                            attribute="heads")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    header, state = read_safetensors(path, _KEY, newest_version=_VERSION, written_by="sparsetorch.shrink.save_shrunk "
                                     "(use sparsetorch.load for files written by sparsetorch.save)")
    if header["version"] < 1:
        raise SparsityError(f"{path} has shrunk-file version {header['version']!r}; the header is corrupted")
    for part in ("shapes", "attrs", "config"):
        if not isinstance(header.get(part), dict):
            raise SparsityError(f"{path} has a corrupted header: {part!r} is not a mapping")
    shapes = header["shapes"]
    for key, value in state.items():
        if list(value.shape) != shapes.get(key):
            raise SparsityError(f"{path}: tensor {key} has shape {list(value.shape)} but the header says "
                                f"{shapes.get(key)}; the file is corrupted")
    return header, state
