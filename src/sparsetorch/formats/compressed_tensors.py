"""Read (and write) the sparse checkpoints of llm-compressor / ``compressed-tensors``, without that package.

A compressed-tensors checkpoint is a Hugging Face model folder: ``config.json`` with a
``quantization_config`` (older: ``compression_config``) whose ``sparsity_config.format`` says how the
targeted weights are stored, and one or several ``*.safetensors`` shards (``model.safetensors.index.json``
maps names to shards). Each compressed weight ``<module>.weight`` is replaced by tensors named after its
module, in row-major order:

``sparse-bitmask`` (any sparsity)
    ``<module>.shape`` int64 ``[2]`` (rows, cols); ``<module>.compressed`` the nonzero values, 1-D, in the
    weight's dtype; ``<module>.bitmask`` uint8 ``[rows, ceil(cols/8)]``, each row packed on its own with
    ``numpy.packbits(bitorder="little")`` (bit ``j % 8`` of byte ``j // 8`` is column ``j``; padding bits 0);
    ``<module>.row_offsets`` int64 ``[rows]``, where each row's values start in ``compressed``.
``sparse-24-bitmask`` (2:4)
    ``<module>.shape`` int64 ``[2, 1]``; ``<module>.compressed`` ``[rows, cols/2]``, the two kept values of
    every group of four; ``<module>.bitmask`` as above, exactly two bits set in every group of four
    consecutive weights (a group with fewer nonzeros keeps zeros too: the package takes the top two by
    magnitude).

compressed-tensors 0.14 was the last release to read or write these (0.15 dropped both formats), so
checkpoints written by llm-compressor in them load here with ``safetensors`` and numpy alone. Quantized
checkpoints (``int-quantized``, ``float-quantized``, ``marlin-24``, ``pack-quantized``, ... with or
without sparsity) are refused, naming their format: only float16/bfloat16/float32 values are read.

Everything is validated before anything is returned or any weight is set: an unknown format, a missing
tensor or shard, shapes that disagree, a bitmask whose bits do not match its values, row offsets or the
2:4 rule, or a NaN value raises ``SparsityError``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.masks import set_mask
from ..core.rollback import rollback
from ..errors import SparsityError
from .atomic import atomic_write
from .index_checks import check_shape
from .safetensors_file import INDEX_FILE, read_safetensors_file, shard_files

__all__ = ["read_compressed_tensors", "load_compressed_tensors", "save_compressed_tensors", "SPARSE_FORMATS",
           "FORMAT_PARTS"]

SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
# the tensors that replace <module>.weight, per format
FORMAT_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
                "sparse-24-bitmask": ("shape", "compressed", "bitmask")}
_ALL_PARTS = frozenset(p for parts in FORMAT_PARTS.values() for p in parts)
# "dense": the sparsity is recorded but the weights are stored plainly (llm-compressor's
# disable_sparse_compression=True); read as they are
_READABLE = (*SPARSE_FORMATS, "dense")
_CONFIG_KEYS = ("quantization_config", "compression_config")
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WRITTEN_BY = "llm-compressor / compressed-tensors"
_COMPRESSED_TENSORS_VERSION = "0.13.0"  # the package version our writer's layout matches (0.10 - 0.14)


def _fail(message: str, **context: object):
    raise SparsityError(message, **context)


# ------------------------------------------------------------------------------------------------- config


def read_config(directory: str | os.PathLike) -> tuple[dict, dict]:
    """``(config.json as a dict, its sparsity_config)`` of a compressed-tensors checkpoint folder; raises
    ``SparsityError`` unless it is one whose format this reader supports."""
    directory = Path(directory)
    if not directory.is_dir():
        _fail(f"{directory} is not a folder; pass the checkpoint folder (config.json and *.safetensors)",
              path=str(directory))
    config_path = directory / "config.json"
    if not config_path.is_file():
        _fail(f"{directory} has no config.json; a compressed-tensors checkpoint is a Hugging Face model folder",
              path=str(directory))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{config_path} is not valid JSON ({exc}); the file is damaged", path=str(config_path))
    if not isinstance(config, dict):
        _fail(f"{config_path} does not hold a JSON object; the file is damaged", path=str(config_path))
    key = next((k for k in _CONFIG_KEYS if isinstance(config.get(k), dict)), None)
    if key is None:
        _fail(f"{config_path} has no quantization_config (or compression_config): this is not a compressed-tensors "
              "checkpoint; a plain Hugging Face folder loads with transformers' from_pretrained",
              path=str(config_path))
    qconfig = config[key]
    method = qconfig.get("quant_method", "compressed-tensors")
    if method not in ("compressed-tensors", "sparseml"):
        _fail(f"{config_path} is a {method!r} checkpoint, not compressed-tensors; sparsetorch reads the "
              f"compressed-tensors formats {list(SPARSE_FORMATS)}", quant_method=method)
    _refuse_quantization(qconfig, config_path)
    sparsity = qconfig.get("sparsity_config")
    if not isinstance(sparsity, dict) or not sparsity:
        _fail(f"{config_path} has a compressed-tensors config without a sparsity_config: nothing is sparse in it; "
              "load it with transformers' from_pretrained", path=str(config_path))
    fmt = sparsity.get("format")
    if fmt not in _READABLE:
        _fail(f"{config_path}: compressed-tensors sparsity format {fmt!r} is not supported; sparsetorch reads "
              f"{list(SPARSE_FORMATS)} (and 'dense') with float16/bfloat16/float32 values", format=fmt,
              supported=list(_READABLE))
    for name in ("targets", "ignore"):
        value = sparsity.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            _fail(f"{config_path}: sparsity_config.{name} must be a list of strings, got {value!r}; the file is damaged")
    return config, sparsity


def _refuse_quantization(qconfig: dict, where: Path) -> None:
    """Quantized values (with or without sparsity) need a dequantizer: refuse them, naming the format."""
    groups = qconfig.get("config_groups")
    qformat = qconfig.get("format")
    quantized = bool(groups) or qconfig.get("kv_cache_scheme") or (qformat not in (None, "dense"))
    if quantized:
        formats = {qformat} if qformat else set()
        if isinstance(groups, dict):
            formats |= {g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")}
        named = ", ".join(sorted(map(str, formats))) or "quantized"
        _fail(f"{where} is a quantized compressed-tensors checkpoint (format {named}); sparsetorch reads only the "
              f"sparse formats {list(SPARSE_FORMATS)} over float16/bfloat16/float32 values. Dequantize it first "
              "(e.g. compressed-tensors' converter) or start from the unquantized sparse model",
              format=sorted(map(str, formats)) or None)
    if qconfig.get("transform_config"):
        _fail(f"{where} has a transform_config (rotations applied to the weights); sparsetorch cannot undo it",
              path=str(where))


# ------------------------------------------------------------------------------------------------ tensors


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    files, weight_map = shard_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        _, found = read_safetensors_file(path, written_by=_WRITTEN_BY)
        for key, value in found.items():
            if key in tensors:
                _fail(f"tensor {key!r} is stored twice (again in {path.name}); the checkpoint is damaged", key=key)
            if weight_map is not None and weight_map.get(key) != path.name:
                _fail(f"{path.name} holds {key!r}, which {INDEX_FILE} places in {weight_map.get(key)!r}; the "
                      "checkpoint is damaged", key=key, shard=path.name)
            tensors[key] = value
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(tensors))
        if lost:
            _fail(f"{INDEX_FILE} lists {len(lost)} tensors its shards do not hold (e.g. {lost[0]!r} in "
                  f"{weight_map[lost[0]]!r}); a shard is truncated or from another checkpoint", missing=lost[:10])
    return tensors, [p.name for p in files]


def _split(tensors: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``(compressed: module -> {part: tensor}, plain: name -> tensor)``."""
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    plain = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".")
        if module and part in _ALL_PARTS:
            compressed.setdefault(module, {})[part] = value
        else:
            plain[key] = value
    if fmt == "dense":  # nothing is compressed: a stray "*.shape" is some model's own tensor
        stray = next((m for m, parts in compressed.items() if {"compressed", "bitmask"} & set(parts)), None)
        if stray is not None:
            _fail(f"the sparsity format is 'dense' but {stray!r} is stored compressed ({sorted(compressed[stray])}); "
                  "the config does not match the weights", module=stray)
        return {}, tensors
    want = FORMAT_PARTS[fmt]
    for module, parts in compressed.items():
        if f"{module}.weight" in plain:
            _fail(f"{module} is stored both dense ({module}.weight) and compressed ({sorted(parts)}); the checkpoint "
                  "is damaged", module=module)
        missing = [p for p in want if p not in parts]
        extra = sorted(set(parts) - set(want))
        if extra:
            _fail(f"{module}: {module}.{extra[0]} does not belong to a {fmt} weight (is the config's format right?)",
                  module=module, unexpected=[f"{module}.{p}" for p in extra])
        if missing:
            _fail(f"{module}: the {fmt} weight lacks the tensor {module}.{missing[0]} (it has {sorted(parts)}); the "
                  "checkpoint is truncated or damaged", module=module, missing=[f"{module}.{p}" for p in missing])
    return compressed, plain


def _dense_shape(module: str, shape: torch.Tensor) -> tuple[int, int]:
    if shape.dtype.is_floating_point or shape.dtype.is_complex or shape.dtype == torch.bool or shape.numel() != 2:
        _fail(f"{module}.shape must hold the two integer dimensions of the weight, got {shape.dtype} "
              f"{list(shape.shape)}; the checkpoint is damaged", module=module)
    rows, cols = check_shape(f"{module}.shape", [int(v) for v in shape.reshape(-1).tolist()], ndim=2)
    return rows, cols


def _unpacked_mask(module: str, bitmask: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """The bool ``[rows, cols]`` mask of a row-wise little-endian packed bitmask, after checking its dtype,
    shape and clear padding bits."""
    width = (cols + 7) // 8
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, width):
        _fail(f"{module}.bitmask is {str(bitmask.dtype).removeprefix('torch.')} {list(bitmask.shape)}, expected uint8 "
              f"[{rows}, {width}] for a {rows}x{cols} weight; the checkpoint is damaged", module=module,
              shape=list(bitmask.shape), expected=[rows, width])
    bits = np.unpackbits(bitmask.numpy(), axis=1, bitorder="little").astype(bool, copy=False)
    if cols % 8 and bits[:, cols:].any():
        row = int(np.flatnonzero(bits[:, cols:].any(axis=1))[0])
        _fail(f"{module}.bitmask sets bits past the {cols} columns in row {row}; the bitmask is corrupted",
              module=module, row=row)
    return bits[:, :cols]


def _values(module: str, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if values.dtype not in _VALUE_DTYPES:
        what = ("quantized (integer or float8) values" if values.dtype in
                (torch.int8, torch.uint8, torch.int32, getattr(torch, "float8_e4m3fn", None)) else "values")
        _fail(f"{module}.compressed holds {what} of dtype {str(values.dtype).removeprefix('torch.')}; sparsetorch "
              "reads float16/bfloat16/float32 sparse weights (quantized checkpoints are not supported)",
              module=module, dtype=str(values.dtype))
    if tuple(values.shape) != shape:
        _fail(f"{module}.compressed has shape {list(values.shape)}, expected {list(shape)}; the checkpoint is "
              "damaged", module=module, shape=list(values.shape), expected=list(shape))
    return values


def _decode(module: str, parts: dict[str, torch.Tensor], fmt: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(dense weight, bool mask)`` of one compressed weight, every part checked first."""
    rows, cols = _dense_shape(module, parts["shape"])
    mask = _unpacked_mask(module, parts["bitmask"], rows, cols)
    per_row = mask.sum(axis=1, dtype=np.int64)
    nnz = int(per_row.sum())
    if fmt == "sparse-bitmask":
        if parts["compressed"].ndim == 1 and parts["compressed"].numel() != nnz:
            _fail(f"{module}.bitmask sets {nnz} bits but {module}.compressed holds {parts['compressed'].numel()} values; "
                  "the bitmask or the values are corrupted", module=module, bits_set=nnz,
                  values=parts["compressed"].numel())
        values = _values(module, parts["compressed"], (nnz,))
        offsets = parts["row_offsets"]
        if offsets.dtype.is_floating_point or offsets.dtype == torch.bool or tuple(offsets.shape) != (rows,):
            _fail(f"{module}.row_offsets is {str(offsets.dtype).removeprefix('torch.')} {list(offsets.shape)}, "
                  f"expected integers [{rows}]; the checkpoint is damaged", module=module)
        expected = np.concatenate(([0], np.cumsum(per_row)[:-1])) if rows else per_row
        found = offsets.numpy().astype(np.int64, copy=False)
        if not np.array_equal(found, expected):
            row = int(np.flatnonzero(found != expected)[0])
            _fail(f"{module}.row_offsets says row {row} starts at value {int(found[row])} but the bitmask puts it "
                  f"at {int(expected[row])}; the bitmask or the offsets are corrupted", module=module, row=row)
    else:
        if (rows * cols) % 4 or cols % 2:
            _fail(f"{module} is {rows}x{cols}: 2:4 groups need the weight's size divisible by 4 and an even number of "
                  "columns; the checkpoint is damaged", module=module)
        groups = mask.reshape(-1, 4).sum(axis=1)
        if (groups != 2).any():
            bad = int(np.flatnonzero(groups != 2)[0])
            _fail(f"{module}.bitmask has {int(groups[bad])} bits set in group {bad} (weights {4 * bad}-{4 * bad + 3} in "
                  "row-major order); sparse-24-bitmask keeps exactly 2 of every 4. The bitmask is corrupted",
                  module=module, group=bad, bits_set=int(groups[bad]))
        values = _values(module, parts["compressed"], (rows, cols // 2))
    if torch.isnan(values).any():
        _fail(f"{module}.compressed holds NaN values; the checkpoint is damaged", module=module)
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[torch.from_numpy(np.ascontiguousarray(mask))] = values.reshape(-1)
    return dense, mask


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(state_dict, masks, info)``: :func:`read_compressed_tensors` plus the bool keep-mask of each
    compressed weight (the stored bitmask; for 2:4 it can keep a zero)."""
    directory = Path(path)
    config, sparsity = read_config(directory)
    fmt = sparsity["format"]
    tensors, files = _read_tensors(directory)
    compressed, plain = _split(tensors, fmt)
    for key, value in plain.items():
        if value.dtype.is_floating_point and torch.isnan(value).any():
            _fail(f"{key} holds NaN values; the checkpoint is damaged", key=key)
    state = dict(plain)
    masks: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict] = {}
    for module in sorted(compressed):
        dense, mask = _decode(module, compressed[module], fmt)
        key = f"{module}.weight"
        state[key] = dense
        masks[key] = torch.from_numpy(np.ascontiguousarray(mask))
        nonzero = int(torch.count_nonzero(dense))
        sparse[key] = {"shape": list(dense.shape), "dtype": str(dense.dtype).removeprefix("torch."),
                       "nnz": nonzero, "sparsity": 1 - nonzero / max(dense.numel(), 1),
                       "pattern": "2:4" if fmt == "sparse-24-bitmask" else "unstructured"}
    qconfig = next(config[k] for k in _CONFIG_KEYS if isinstance(config.get(k), dict))
    numel = sum(sparse[k]["shape"][0] * sparse[k]["shape"][1] for k in sparse)
    info = {"format": fmt, "compressed_tensors_version": qconfig.get("version"),
            "sparsity_structure": sparsity.get("sparsity_structure"),
            "global_sparsity": sparsity.get("global_sparsity"),
            "targets": sparsity.get("targets"), "ignore": sparsity.get("ignore"), "files": files,
            "sparse_weights": sparse,
            "sparsity_of_sparse_weights": 1 - sum(s["nnz"] for s in sparse.values()) / numel if numel else 0.0}
    return state, masks, info


def read_compressed_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a compressed-tensors checkpoint folder into a plain dense ``state_dict`` (zeros in place, each
    tensor in its stored dtype) and ``info``.

    ``info`` has the ``format``, the config's ``sparsity_structure``, ``global_sparsity``, ``targets`` and
    ``ignore``, the shard ``files`` read, and ``sparse_weights``: per decompressed weight its shape, dtype,
    nonzeros, sparsity and pattern. Every tensor is validated first; a bad checkpoint raises
    ``SparsityError`` and nothing is returned.
    """
    state, _, info = read_checkpoint(path)
    return state, info


# ------------------------------------------------------------------------------------------------ loading


def _tied_keys(model: nn.Module) -> dict[str, list[str]]:
    """state_dict key -> the other keys holding the same tensor (tied weights such as lm_head/embeddings)."""
    by_storage: dict[tuple, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
            by_storage.setdefault(ident, []).append(key)
    return {k: [o for o in keys if o != k] for keys in by_storage.values() if len(keys) > 1 for k in keys}


def _check_against(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    tied = _tied_keys(model)
    missing = sorted(k for k in expected if k not in state and not any(o in state for o in tied.get(k, ())))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        _fail(f"{path} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the architecture the "
              "checkpoint's config.json describes (or pass only the folder)", missing=missing, unexpected=unexpected)
    for key, value in state.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            _fail(f"{key} has shape {list(value.shape)} in {path} but {list(expected[key].shape)} in the model",
                  key=key, shape=list(value.shape), expected=list(expected[key].shape))
        for other in tied.get(key, ()):
            if other in state and not torch.equal(state[other].to(value.dtype), value):
                _fail(f"{key} and {other} are one tied weight in the model but differ in {path}", key=key)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], path: Path,
               keep_masks: bool) -> nn.Module:
    _check_against(model, state, path)
    modules = dict(model.named_modules())
    with rollback(model, what=f"loading {path}"):
        model.load_state_dict(state, strict=False)  # every key was checked; tied partners fill themselves
        if keep_masks:
            for key, mask in masks.items():
                fqn, _, pname = key.rpartition(".")
                set_mask(modules[fqn], mask, pname)
    return model


def _dominant_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for value in state.values():
        if value.dtype.is_floating_point:
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else None


def _no_init_weights():
    """transformers' context that skips random initialisation (every weight is loaded right after)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(module).no_init_weights()
    return contextlib.nullcontext()


def _build_model(directory: Path, config: dict, dtype: torch.dtype) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise SparsityError("building the model from a checkpoint folder needs transformers: "
                            "pip install 'sparsetorch[transformers]' (or pass a model: "
                            "load_compressed_tensors(model, path))") from None
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unusable config
        raise SparsityError(f"transformers cannot read {directory / 'config.json'} ({exc}); build the model "
                            "yourself and call load_compressed_tensors(model, path)") from None
    for key in _CONFIG_KEYS:  # transformers would hand the weights to compressed-tensors otherwise
        if hasattr(hf_config, key):
            with contextlib.suppress(AttributeError):
                delattr(hf_config, key)
            if getattr(hf_config, key, None) is not None:
                setattr(hf_config, key, None)
    model_class = transformers.AutoModelForCausalLM
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        found = getattr(transformers, names[0], None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            model_class = found
    version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"  # the keyword's name until 4.56
    try:
        with _no_init_weights():
            builder = model_class._from_config if model_class is not transformers.AutoModelForCausalLM \
                else model_class.from_config
            model = builder(hf_config, **{dtype_kw: dtype})
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # skipped with the initialisation in transformers 5; the checkpoint stores tied weights once
    except Exception as exc:  # noqa: BLE001
        raise SparsityError(f"transformers cannot build the model of {directory} ({type(exc).__name__}: {exc}); "
                            "build it yourself and call load_compressed_tensors(model, path)") from None
    return model


def load_compressed_tensors(model_or_path: nn.Module | str | os.PathLike, path: str | os.PathLike | None = None, *,
                            dtype: torch.dtype | None = None, masks: bool = False) -> nn.Module:
    """Load a compressed-tensors sparse checkpoint (llm-compressor's ``sparse-bitmask`` /
    ``sparse-24-bitmask``) and return the model: dense weights with zeros in place, in eval mode.

    ``load_compressed_tensors(folder)`` builds the model from the folder's ``config.json`` with transformers
    (its ``quantization_config`` stripped) and loads every tensor strictly; ``dtype`` (default: the stored
    one) is the model's dtype; ``torch.float32`` lets ``sparsetorch.to_inference`` run the sparse CPU kernels.
    ``load_compressed_tensors(model, folder)`` loads into your model (in place) instead: names and shapes
    must match exactly (tied weights may be stored once). ``masks=True`` also attaches sparsetorch masks from
    the stored bitmasks, so fine-tuning keeps the sparsity. The whole checkpoint is validated before any
    weight is set; on any problem ``SparsityError`` and the model is unchanged.
    """
    if isinstance(model_or_path, nn.Module):
        if path is None:
            _fail("load_compressed_tensors(model, path) needs the checkpoint folder too")
        if dtype is not None:
            _fail("dtype= applies when the model is built from the folder; cast your model with model.to(dtype)")
        state, stored_masks, _ = read_checkpoint(path)
        return _load_into(model_or_path, state, stored_masks, Path(path), masks)
    if path is not None:
        _fail("pass load_compressed_tensors(folder) or load_compressed_tensors(model, folder)", got=str(path))
    directory = Path(model_or_path)
    state, stored_masks, _ = read_checkpoint(directory)
    config, _ = read_config(directory)
    target = dtype or _dominant_float_dtype(state) or torch.float32
    model = _build_model(directory, config, target)
    return _load_into(model, state, stored_masks, directory, masks).eval()


# ------------------------------------------------------------------------------------------------ writing


def _pack_rows(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def _mask_24(weight: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' 2:4 keep-mask: the two largest magnitudes of each group of four (same torch call,
    so the same choice among zeros)."""
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return keep.reshape(weight.shape)


def compress_weight(module: str, weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for ``<module>.weight`` in ``fmt`` (exactly its layout)."""
    weight = weight.detach().cpu()
    if weight.ndim != 2 or weight.dtype not in _VALUE_DTYPES:
        _fail(f"{module}.weight is {weight.dtype} {list(weight.shape)}; compressed-tensors stores 2-D "
              "float16/bfloat16/float32 weights", module=module)
    rows, cols = weight.shape
    if fmt == "sparse-bitmask":
        mask = weight != 0
        counts = mask.sum(dim=-1)
        return {f"{module}.shape": torch.tensor([rows, cols]), f"{module}.compressed": weight[mask].contiguous(),
                f"{module}.bitmask": _pack_rows(mask), f"{module}.row_offsets": torch.cumsum(counts, 0) - counts}
    if cols % 4:
        _fail(f"{module}.weight has {cols} columns; 2:4 needs a multiple of 4 (add it to ignore=)", module=module)
    nonzero = (weight != 0).reshape(-1, 4).sum(dim=1)
    if (nonzero > 2).any():
        group = int(torch.nonzero(nonzero > 2)[0])
        _fail(f"{module}.weight is not 2:4 sparse (group {group} of four keeps {int(nonzero[group])}); prune it 2:4 "
              "or add it to ignore=", module=module, group=group)
    mask = _mask_24(weight)
    return {f"{module}.shape": torch.tensor([rows, cols]).reshape(-1, 1),
            f"{module}.compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
            f"{module}.bitmask": _pack_rows(mask)}


def _matches(name: str, patterns) -> bool:
    return any(name == p or (p.startswith("re:") and re.fullmatch(p[3:], name)) for p in patterns)


def save_compressed_tensors(model: nn.Module, directory: str | os.PathLike, format: str = "sparse-bitmask", *,
                            ignore: tuple[str, ...] | list[str] = ("lm_head",),
                            max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint folder in ``format`` ("sparse-bitmask" or
    "sparse-24-bitmask"): every ``nn.Linear`` weight except the modules named in ``ignore`` (names, or
    ``"re:<regex>"``) is compressed exactly as compressed-tensors 0.10-0.14 does, other tensors are stored
    as they are; tied weights once. ``config.json`` is the model's Hugging Face config (when it has one) plus
    the ``quantization_config`` llm-compressor writes. ``max_shard_bytes`` splits the tensors into shards with
    a ``model.safetensors.index.json``. Each file is written atomically, config.json last; returns the folder.
    A 2:4 target with more than two nonzeros in a group raises ``SparsityError`` (nothing is dropped).
    """
    from safetensors.torch import save as safetensors_bytes

    if format not in SPARSE_FORMATS:
        _fail(f"format must be one of {list(SPARSE_FORMATS)}, got {format!r}", format=format)
    directory = Path(directory)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = {name for name in linear if not _matches(name, ignore)}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    params = total_zero = 0
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):  # (sparsetorch masks are not in the state_dict)
            continue
        if value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
            if ident in seen:
                continue  # a tied weight: stored once, like save_pretrained does
            seen.add(ident)
        params += value.numel()
        total_zero += int((value == 0).sum()) if value.dtype.is_floating_point else 0
        module, _, pname = key.rpartition(".")
        if pname == "weight" and module in targets:
            tensors.update(compress_weight(module, value, format))
        else:
            tensors[key] = value.detach().cpu().contiguous()
    config: dict[str, Any] = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        # no "transform_config": {} as 0.12+ writes: 0.10/0.11 take any unknown key for a quantization config
        "quant_method": "compressed-tensors", "version": _COMPRESSED_TENSORS_VERSION,
        "sparsity_config": {"format": format, "global_sparsity": total_zero / params if params else 0.0,
                            "ignore": sorted(linear - targets), "registry_requires_subclass": False,
                            "sparsity_structure": "2:4" if format == "sparse-24-bitmask" else "unstructured",
                            "targets": ["Linear"]}}
    shards = _shards(tensors, max_shard_bytes)
    for name, part in shards.items():
        atomic_write(directory / name, safetensors_bytes(part, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, part in shards.items() for key in sorted(part)}}
        atomic_write(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True).encode())
    atomic_write(directory / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str).encode())
    return directory


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> dict[str, dict[str, torch.Tensor]]:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if max_bytes is not None and groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = value
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}

