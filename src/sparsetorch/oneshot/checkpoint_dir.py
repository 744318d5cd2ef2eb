"""A Hugging Face checkpoint folder as a model whose weights stay on disk until asked for.

The model is built from ``config.json`` on the meta device (no memory), checked against the shards'
headers (every weight present, with the shape the config implies), and then parts of it are read in
and dropped again: ``load(module)`` fills one block (or the embeddings) from the shards,
``release(module)`` puts it back on the meta device. Non-persistent buffers (rotary tables) are rebuilt
by transformers' own initialisation, and refused if it cannot rebuild them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..core.masks import remove_masks
from ..core.quant_grid import iter_quant_grids, remove_quant_grid
from ..errors import SparsityError
from ..formats.safetensors_file import ShardedCheckpoint
from .blocks import find_blocks
from .heap import return_freed_memory

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FIX = "the folder must be written by save_pretrained for this config (copy it whole, or fix config.json)"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SparsityError("pruning a checkpoint folder needs transformers: pip install 'sparsetorch[transformers]'") \
            from None
    return transformers


def _dominant_dtype(ckpt: ShardedCheckpoint) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for key, code in ckpt.dtypes.items():
        if code in _DTYPES:
            n = 1
            for d in ckpt.shapes[key]:
                n *= d
            counts[_DTYPES[code]] = counts.get(_DTYPES[code], 0) + n
    return max(counts, key=counts.get) if counts else torch.float32


def _build_on_meta(directory: Path, dtype: torch.dtype) -> nn.Module:
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unusable config
        raise SparsityError(f"transformers cannot read {directory / 'config.json'} ({exc}); pass a folder written by "
                            "save_pretrained", path=str(directory)) from None
    version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"  # the keyword's name until 4.56
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, **{dtype_kw: dtype})
    except Exception as exc:  # noqa: BLE001
        raise SparsityError(f"transformers cannot build a causal LM from {directory / 'config.json'} "
                            f"({type(exc).__name__}: {exc})", path=str(directory)) from None
    return model.eval()


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()`` in slices: on a whole embedding its temporaries would cost more than the tensor."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter (tied embeddings and head), each group in module order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class CheckpointModel:
    """``config.json`` + shards of ``directory`` as a meta-device model, its decoder blocks and the map from
    each block to its tensors; everything checked when constructed, before anything is read or written."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir() or not (self.directory / "config.json").is_file():
            raise SparsityError(f"{self.directory} is not a Hugging Face model folder (no config.json); pass the "
                                "folder written by save_pretrained", path=str(self.directory))
        self.checkpoint = ShardedCheckpoint(self.directory)
        self.model = _build_on_meta(self.directory, _dominant_dtype(self.checkpoint))
        self.aliases = {n: group for group in _alias_groups(self.model) for n in group}
        self._check_keys()
        found = find_blocks(self.model)
        if found is None:
            raise SparsityError(f"{type(self.model).__name__} has no stack of repeated blocks; out-of-core pruning "
                                "reads a transformer one block at a time", model=type(self.model).__name__)
        self.prefix, self.blocks = found
        self.block_keys = [[k for k in self.checkpoint.keys() if k.startswith(f"{self.prefix}.{i}.")]
                           for i in range(len(self.blocks))]
        inside = {k for keys in self.block_keys for k in keys}
        self.other_keys = [k for k in self.checkpoint.keys() if k not in inside]

    def _check_keys(self) -> None:
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        stored = self.checkpoint.shapes
        missing = sorted(k for k in expected if k not in stored and not any(a in stored for a in self.aliases.get(k, ())))
        ignored = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ()]
        unexpected = sorted(k for k in stored if k not in expected and not any(p.search(k) for p in ignored))
        if missing or unexpected:
            raise SparsityError(f"{self.directory}: the weights do not match config.json: missing {missing[:5]}"
                                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                f"{'...' if len(unexpected) > 5 else ''}; {_FIX}", missing=missing[:20],
                                unexpected=unexpected[:20])
        for key, shape in stored.items():
            if key in expected and expected[key] != shape:
                raise SparsityError(f"{self.directory}: {key} has shape {list(shape)} in the shards but config.json "
                                    f"implies {list(expected[key])}; {_FIX}", key=key, shape=list(shape),
                                    expected=list(expected[key]))

    # -- reading parts in and dropping them ----------------------------------------------------------------

    def load(self, module: nn.Module, keys: list[str], prefix: str = "") -> None:
        """Fill ``module`` (a part of the model named ``prefix``) with the tensors ``keys`` from the shards, in
        the model's dtypes; its non-persistent buffers are rebuilt. Checks every value is finite."""
        self.rebuild_buffers(module)
        for key, value in self.checkpoint.read(keys).items():
            owner, name = _owner(self.model, key)
            current = owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)
            if current is not None and current.dtype.is_floating_point and value.dtype != current.dtype:
                value = value.to(current.dtype)
            if value.dtype.is_floating_point and not _all_finite(value):
                raise SparsityError(f"{key} contains NaN or inf in {self.directory}; fix the weights before pruning",
                                    key=key)
            owner, name = _owner(self.model, key)
            if name in owner._parameters:
                value = nn.Parameter(value, requires_grad=False)
            for alias in self.aliases.get(key, [key]):  # tied weights stay one Parameter
                owner, name = _owner(self.model, alias)
                (owner._parameters if name in owner._parameters else owner._buffers)[name] = value

    def rebuild_buffers(self, module: nn.Module) -> None:
        """Non-persistent buffers on the meta device (rotary tables...): recomputed by transformers' own
        initialisation of their module; a buffer it cannot rebuild is refused (it would hold garbage)."""
        for sub in module.modules():
            names = [n for n, b in sub._buffers.items() if b is not None and b.device.type == "meta"
                     and n in sub._non_persistent_buffers_set]
            if not names:
                continue
            for n in names:
                buf = sub._buffers[n]
                if not buf.dtype.is_floating_point:
                    raise SparsityError(f"{type(sub).__name__}.{n} is a computed {buf.dtype} buffer that out-of-core "
                                        "pruning cannot rebuild; load the model in memory instead", buffer=n)
                sub._buffers[n] = torch.full(buf.shape, float("nan"), dtype=buf.dtype)
            with contextlib.suppress(AttributeError, NotImplementedError):
                with torch.no_grad():
                    self.model._init_weights(sub)
            bad = [n for n in names if torch.isnan(sub._buffers[n]).any()]
            if bad:
                raise SparsityError(f"{type(sub).__name__} has computed buffers {bad} that transformers does not "
                                    "rebuild; out-of-core pruning cannot run this model, load it in memory instead",
                                    buffers=bad)

    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s tensors (back to the meta device), its masks and quantization grids too."""
        remove_masks(module)
        for item in list(iter_quant_grids(module)):
            remove_quant_grid(item.module, item.name)
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = torch.empty_like(b, device="meta")
        return_freed_memory()  # a dropped block's pages, before the next block is read

    def config_text(self) -> str:
        return (self.directory / "config.json").read_text(encoding="utf-8")

    def describe(self) -> dict:
        return {"model": type(self.model).__name__, "blocks": len(self.blocks), "prefix": self.prefix,
                "layout": self.checkpoint.digest(), "config": json.loads(self.config_text())}

