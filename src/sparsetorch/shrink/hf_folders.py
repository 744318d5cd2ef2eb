"""Saving width- or depth-pruned transformers models so that they load anywhere, or with one documented loader.

    sparsetorch.shrink.save_pretrained(model, "small/")     # model.save_pretrained + what the config cannot say
    model = sparsetorch.shrink.from_pretrained("small/")    # either kind of folder

When a fresh ``type(model)(config)`` has exactly the model's shapes (uniform widths that the config expresses),
the folder is a plain transformers checkpoint: ``transformers.AutoModelForCausalLM.from_pretrained`` loads it
without sparsetorch. Otherwise (per-block widths, GPT-2 heads or hidden size) ``config.json`` gets a
``sparsetorch_shrink`` entry listing every tensor whose shape differs from the config's and the layer sizes that
go with it (``in_features``, ``num_key_value_groups``...); :func:`from_pretrained` builds the model from the
config, resizes those tensors, and loads the weights. Either way the entry's ``loader`` and the folder's
``SHRUNK.md`` say which loader the folder needs.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import SparsityError
from ..formats.safetensors_file import read_safetensors_file

__all__ = ["save_pretrained", "from_pretrained", "PLAIN", "LOADER"]

KEY = "sparsetorch_shrink"
PLAIN = "transformers.AutoModelForCausalLM.from_pretrained"
LOADER = "sparsetorch.shrink.from_pretrained"
_VERSION = 1
# the only layer attributes a folder may set: sizes the forward passes read
_ATTRS = ("in_features", "out_features", "nx", "nf", "embedding_dim", "num_embeddings", "num_heads", "split_size",
          "num_key_value_groups", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_experts",
          "num_local_experts", "top_k", "hidden_dim", "normalized_shape")


def _sizes(module: nn.Module) -> dict[str, object]:
    out = {}
    for a in _ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            out[a] = v
        elif isinstance(v, tuple) and all(isinstance(x, int) for x in v):
            out[a] = list(v)
    return out


def _differences(model: nn.Module) -> dict:
    """Shapes and layer sizes of ``model`` that a fresh model built from its config does not have."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    ours, theirs = model.state_dict(), fresh.state_dict()
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise SparsityError(f"the model lacks tensors its config builds ({missing[:4]}); it cannot be saved as a "
                            "transformers folder", missing=missing[:10])
    shapes = {k: list(v.shape) for k, v in ours.items() if k not in theirs or tuple(theirs[k].shape) != tuple(v.shape)}
    fresh_modules = dict(fresh.named_modules())
    attrs = {}
    for name, module in model.named_modules():
        mine, base = _sizes(module), _sizes(fresh_modules.get(name, nn.Module()))
        changed = {a: v for a, v in mine.items() if base.get(a) != v}
        if changed:
            attrs[name] = changed
    return {"shapes": shapes, "attrs": attrs}


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(path, **kwargs)``, plus the ``sparsetorch_shrink`` config entry and ``SHRUNK.md``.

    The folder is written next to ``path`` and moved into place, so a failed save leaves no half-written folder."""
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise SparsityError(f"expected a transformers PreTrainedModel, got {type(model).__name__}; use "
                            "sparsetorch.shrink.save_shrunk for other models")
    diff = _differences(model)
    plain = not diff["shapes"] and not diff["attrs"]
    entry = {"version": _VERSION, "loader": PLAIN if plain else LOADER, **({} if plain else diff)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        setattr(model.config, KEY, entry)
        try:
            model.save_pretrained(tmp, **kwargs)
        finally:
            delattr(model.config, KEY)
        (tmp / "SHRUNK.md").write_text(_readme(entry))
        path.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _readme(entry: dict) -> str:
    if entry["loader"] == PLAIN:
        how = ("Every width is one the config expresses: load it with plain transformers,\n\n"
               "    transformers.AutoModelForCausalLM.from_pretrained(folder)\n")
    else:
        how = (f"Some widths differ from what config.json alone builds ({len(entry['shapes'])} tensors, listed in\n"
               "config.json under `sparsetorch_shrink`): load it with\n\n"
               "    sparsetorch.shrink.from_pretrained(folder)\n\n"
               "which builds the model from the config, resizes those tensors and loads the weights.\n")
    return "# A model made smaller by sparsetorch.shrink\n\n" + how


def _check_entry(entry: object, path: Path) -> dict:
    bad = f"{path}/config.json has a corrupted {KEY!r} entry"
    if not isinstance(entry, dict) or not isinstance(entry.get("shapes"), dict) or not isinstance(entry.get("attrs"), dict):
        raise SparsityError(f"{bad}: expected 'shapes' and 'attrs' mappings")
    for key, shape in entry["shapes"].items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 2**40
                                                  for s in shape):
            raise SparsityError(f"{bad}: the shape of {key!r} is {shape!r}")
    for name, values in entry["attrs"].items():
        if not isinstance(values, dict):
            raise SparsityError(f"{bad}: the sizes of layer {name!r} are not a mapping")
        for attr, value in values.items():
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**40 or \
                isinstance(value, list) and all(isinstance(v, int) and 0 < v <= 2**40 for v in value)
            if attr not in _ATTRS or not ok:
                raise SparsityError(f"{bad}: it sets {attr}={value!r} on layer {name!r}; only positive sizes among "
                                    f"{list(_ATTRS)} are allowed")
    return entry


def _weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise SparsityError(f"{index} is corrupted ({exc})") from None
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = (path / name).resolve()
        if file.parent != path.resolve():
            raise SparsityError(f"{index} names a file outside the folder: {name!r}")
        state.update(read_safetensors_file(file, written_by="save_pretrained")[1])
    return state


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a folder written by :func:`save_pretrained` (or any transformers causal-LM folder). Plain folders go to
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``; others are built from the config, resized as the
    ``sparsetorch_shrink`` entry says, and loaded strictly (every tensor present, every shape as recorded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    entry = getattr(config, KEY, None)
    if entry is None or (isinstance(entry, dict) and entry.get("loader") == PLAIN):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if kwargs:
        raise SparsityError(f"{path} needs sparsetorch's loader, which takes no transformers loading options "
                            f"({sorted(kwargs)}); load it without them and move or cast the model afterwards "
                            "(model.to(dtype) / model.to(device))", options=sorted(kwargs))
    entry = _check_entry(entry, path)
    state = _weights(path)
    model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    for name in entry["attrs"]:
        if name not in modules:
            raise SparsityError(f"{path}: the {KEY} entry resizes layer {name!r}, which {type(model).__name__} has not")
    current = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    replaced: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor
    for key, shape in entry["shapes"].items():
        owner, _, pname = key.rpartition(".")
        if owner not in modules:
            raise SparsityError(f"{path}: the {KEY} entry names tensor {key!r}, which the model has not")
        old = current.get(key)
        new = replaced.get(id(old)) if old is not None else None
        if new is None:
            like = old if old is not None else state.get(key, torch.empty(0))
            new = torch.empty(shape, dtype=like.dtype)
            new = nn.Parameter(new, requires_grad=True) if old is None or isinstance(old, nn.Parameter) else new
            if old is not None:
                replaced[id(old)] = new
        if isinstance(new, nn.Parameter):
            modules[owner]._parameters[pname] = new
        else:
            modules[owner]._buffers[pname] = new
    for name, values in entry["attrs"].items():
        for attr, value in values.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise SparsityError(f"{path}: the weights do not fit the recorded shapes ({str(exc).splitlines()[0]}); the "
                            "folder is corrupted") from None
    loaded = {id(p) for k, p in model.state_dict(keep_vars=True).items() if k in state}
    missing = [k for k in result.missing_keys if id(model.state_dict(keep_vars=True)[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise SparsityError(f"{path}: the weights do not match the model (missing {missing[:4]}, unexpected "
                            f"{result.unexpected_keys[:4]}); the folder is corrupted", missing=missing[:10])
    return model.eval()
