"""``sparsetorch.save`` / ``sparsetorch.load``: weights and masks in one safetensors file.

No pickle anywhere: a file holds only tensors and a JSON header. Writes are atomic (a temp
file in the same folder, fsynced, then renamed), so a crash mid-write leaves the old file.
Loading validates the whole file against the model before changing anything.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as _st_save

from .. import formats
from .atomic import atomic_write
from .safetensors_file import read_safetensors
from ..errors import SparsityError
from ..core.masks import iter_masks, remove_mask, set_mask
from ..core.quant_grid import QuantGridState, iter_quant_grids, remove_quant_grid, set_quant_grid
from ..core.rollback import rollback

__all__ = ["save", "load", "read_header", "FILE_VERSION"]

FILE_VERSION = 2  # 2: csr/gapmask/nm/bsr formats and lossy value codecs
_META_KEY = "sparsetorch"
PART_SEPARATOR = "::"


def save(model: torch.nn.Module, path: str | os.PathLike, *, format: str | None = None, values: str = "fp32",
         metadata: dict | None = None) -> Path:
    """Write ``model``'s state_dict and masks to ``path`` (safetensors); returns the path.

    Each tensor is stored in the smallest lossless format (dense, bitmask, narrow CSR, gap-coded
    mask, N:M, BSR: every candidate is encoded, the smallest kept), then each part is split into
    byte planes and Huffman-coded (zlib) where that is smaller; ``format`` forces one format for all
    masked tensors. ``values`` picks how weights are stored: "fp32" (default) exactly as they are;
    "fp16"/"bf16" cast floating tensors (relative error <= 2**-11 / 2**-8); "int8" quantizes each
    row of floating matrices symmetrically (error <= max|row| / 254; vectors stay exact), "int4" likewise
    in 4 bits (max|row| / 14), two codes a byte. A weight whose module has a quantization grid
    (``core.quant_grid.set_quant_grid``, e.g. from ``sparsegpt_solve(..., grid=)``) is stored exactly, as
    its integer codes and per-group scales: under "grid" (int8 or int4 codes by the grid's bits; every
    other tensor exact), "int8" (any grid) and "int4" (4-bit grids); ``load`` restores the weights bit for
    bit and the grid with them. Masks are always exact. ``metadata`` (JSON-able: e.g. the architecture and a sparsifier's history) is
    stored in the header; ``read_header(path)[0]["user"]`` returns it.
    """
    if values not in formats.SAVE_VALUES:
        raise SparsityError(f"values must be one of {list(formats.SAVE_VALUES)}, got {values!r}", values=values)
    if format is not None and format not in formats.FORMATS:
        raise SparsityError(f"unknown storage format {format!r}; use one of {sorted(formats.FORMATS)}", format=format)
    masks = {item.qualified_name: item.mask for item in iter_masks(model)}
    grids = {item.qualified_name: item.state for item in iter_quant_grids(model)}
    if values == "grid" and not grids:
        raise SparsityError("values='grid' stores weights on their quantization grids, but no parameter of the model "
                            "has one (sparsegpt_solve(..., grid=) then set_quant_grid); save with values='int8' "
                            "or 'int4' to round each row instead")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    storages: set[int] = set()  # tied weights (lm_head = embedding) share storage; safetensors needs copies
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        mask = masks.get(key)
        value, mask = value.detach().cpu(), None if mask is None else mask.cpu()
        grid = grids.get(key)
        if format is not None and mask is not None:
            parts, meta = _encode_exact(key, format, value, mask, values, grid)
        else:
            _, parts, meta = encode_smallest(value, mask, values, grid=grid, key=key)
        entries[key] = meta
        for suffix, part in parts.items():
            part = part.contiguous()
            if part.numel() and part.untyped_storage().data_ptr() in storages:
                part = part.clone()
            storages.add(part.untyped_storage().data_ptr())
            tensors[f"{key}{PART_SEPARATOR}{suffix}"] = part
    header = {"version": FILE_VERSION, "tensors": entries, "user": metadata or {}}
    payload = _st_save(tensors, metadata={_META_KEY: json.dumps(header)})
    return atomic_write(Path(path), payload)


# tried in this order; the first of equal size wins
_SPARSE_FORMATS = ("bitmask", "gapmask", "csr", "nm", "bsr")


def _exact_outside(value: torch.Tensor, mask: torch.Tensor) -> bool:
    """True if every pruned weight is zero, so a sparse format loses nothing (-0.0 reads back as 0.0)."""
    return not bool(((value != 0) & ~mask.reshape(value.shape)).any())


def _encode_exact(key: str, fmt: str, value, mask, values, grid=None):
    if fmt != "dense" and not _exact_outside(value, mask):
        raise SparsityError(f"{key} has nonzero weights outside its mask, so format {fmt!r} would lose them; "
                            "call sparsetorch.core.masks.apply_masks(model) first or save without format=", key=key)
    prepared = formats.format_registry.prepare(value, values, grid, key)  # a grid error names the grid, not fmt
    try:
        return formats.squeeze(*formats.encode(fmt, value, mask, values, prepared))
    except SparsityError as exc:
        raise SparsityError(f"{key} cannot be stored as {fmt!r}: {exc}", key=key, format=fmt) from None


def encode_smallest(value: torch.Tensor, mask: torch.Tensor | None, values: str = "fp32", *,
                    grid: QuantGridState | None = None, key: str = "tensor"):
    """Encode ``value`` in every format that stores it exactly and keep the smallest: ``(name, parts, meta)``.

    Unmasked tensors are tried sparse only when at least a quarter of them is zero. ``grid``: the weight's
    quantization grid (see ``save``); ``key`` names the tensor in error messages.
    """
    names = ["dense"]
    if value.numel() and (mask is not None and _exact_outside(value, mask)
                          or mask is None and int(torch.count_nonzero(value)) <= 0.75 * value.numel()):
        names += _SPARSE_FORMATS
    prepared = formats.format_registry.prepare(value, values, grid, key)
    candidates = [prepared]
    if prepared[2] == "int4" and grid is not None:
        # 4-bit grid codes also as int8: on small layers their Huffman squeeze beats the packed pairs'
        candidates.append(formats.format_registry.prepare(value, "int8", grid, key))
    best = None
    for candidate in candidates:
        name, parts, meta = _smallest_format(value, mask, values, names, candidate)
        parts, meta = formats.squeeze(parts, meta)  # same gain for every format: done once, on the winner
        size = formats.stored_bytes(parts) + len(json.dumps(meta))
        if best is None or size < best[0]:
            best = (size, name, parts, meta)
    return best[1:]


def _smallest_format(value, mask, values, names, prepared):
    """``(name, parts, meta)`` of the smallest of ``names`` for one prepared codec, before the squeeze."""
    best = None
    nnz = int(mask.sum()) if mask is not None else int(torch.count_nonzero(value))
    isz = formats.format_registry.stored_itemsize(value, prepared[2])
    for name in names:
        # skip a candidate whose smallest possible size already loses: CSR spends >= 1 byte per kept
        # weight on its index, gap codes >= 2 bits
        floor = {"csr": nnz * (isz + 1), "gapmask": nnz * isz + nnz // 4}.get(name, 0)
        if best is not None and floor >= best[0]:
            continue
        try:
            parts, meta = formats.encode(name, value, mask, values, prepared)
        except SparsityError:
            if name == "dense":
                raise
            continue  # e.g. N:M on a width not divisible by M, BSR on an unblocked mask
        size = formats.stored_bytes(parts) + len(json.dumps(meta))
        if best is None or size < best[0]:
            best = (size, name, parts, meta)
    return best[1:]


def choose_format(value: torch.Tensor, mask: torch.Tensor | None, values: str = "fp32") -> str:
    """Name of the smallest format that stores ``value`` (and its mask) exactly."""
    return encode_smallest(value, mask, values)[0]


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse a sparsetorch file: ``(header, raw_parts)``, or raise ``SparsityError``."""
    header, raw = read_safetensors(path, _META_KEY, newest_version=FILE_VERSION, written_by="sparsetorch.save")
    if not isinstance(header.get("tensors"), dict):
        raise SparsityError(f"{path} has a corrupted sparsetorch header (no tensor table)")
    return header, raw


def _claimed_bytes(meta: object) -> int:
    """Bytes a header entry says its decoded tensor takes, from shape and dtype only (nothing decoded yet)."""
    if not isinstance(meta, dict):
        raise SparsityError("file has a corrupted tensor entry in its header")
    shape = formats.format_registry.parse_shape(meta.get("shape"))
    return math.prod(shape) * formats.format_registry.parse_dtype(meta.get("dtype")).itemsize


def read_tensors(path: str | os.PathLike, *, max_bytes: int | None = None,
                 _check=None, _allow_bytes: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode every tensor of a sparsetorch file: ``(state_dict, masks)``.

    A sparse code can claim a huge tensor in a few bytes, so before decoding anything the total
    size the header claims must stay under ``max_bytes`` (default: 1 GiB or 1024x the file size,
    whichever is larger), else ``SparsityError``.
    """
    state, masks, _ = read_tensors_and_grids(path, max_bytes=max_bytes, check=_check, allow_bytes=_allow_bytes)
    return state, masks


def read_tensors_and_grids(path: str | os.PathLike, *, max_bytes: int | None = None, check=None,
                           allow_bytes: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                          dict[str, QuantGridState]]:
    """``read_tensors`` plus the quantization grids the file stores: ``(state_dict, masks, grids)``. ``check``
    sees the header before anything is decoded; ``allow_bytes`` raises the default decoded-size limit."""
    header, raw = read_header(path)
    claimed = sum(_claimed_bytes(meta) for meta in header["tensors"].values())
    if check is not None:
        check(header)  # e.g. load: the shapes must be the model's, which bounds the decoded size
    limit = max_bytes if max_bytes is not None else max(2**30, 1024 * os.path.getsize(path), allow_bytes)
    if claimed > limit:
        raise SparsityError(f"{path} claims {claimed} bytes of decoded tensors, more than the limit of {limit}; it is "
                            "corrupted or hostile (pass max_bytes= to read_tensors to allow it)")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        key, sep, suffix = name.rpartition(PART_SEPARATOR)
        if not sep or key not in header["tensors"]:
            raise SparsityError(f"{path} holds an unexpected tensor {name!r}; it is corrupted")
        grouped.setdefault(key, {})[suffix] = tensor
    state, masks, grids = {}, {}, {}
    for key, meta in header["tensors"].items():
        try:
            value, mask, grid = formats.format_registry.decode_with_grid(grouped.get(key, {}), meta)
        except SparsityError as exc:
            raise SparsityError(f"{path}: tensor {key!r}: {exc}", key=key) from None
        state[key] = value
        if mask is not None:
            masks[key] = mask
        if grid is not None:
            grids[key] = grid
    return state, masks, grids


def load(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> torch.nn.Module:
    """Load weights, masks and quantization grids from ``path`` into ``model`` (in place) and return it.

    The file's header is checked against the model (names, shapes) before anything is decoded,
    then every tensor is decoded and validated; on any problem ``SparsityError`` says what is
    wrong and the model is left untouched. (The old order ``load(path, model)`` still works, with a
    DeprecationWarning.)
    """
    if isinstance(path, torch.nn.Module) and not isinstance(model, torch.nn.Module):
        warnings.warn("sparsetorch.load(path, model) is deprecated; write load(model, path), like save(model, path)",
                      DeprecationWarning, stacklevel=2)
        model, path = path, model
    if not isinstance(model, torch.nn.Module):
        raise SparsityError(f"load(model, path) needs an nn.Module first, got {type(model).__name__}")
    expected = model.state_dict()

    def check(header: dict) -> None:
        names = set(header["tensors"])
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if strict and (missing or unexpected):
            raise SparsityError(
                f"{path} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the same architecture "
                "before loading",
                missing=missing, unexpected=unexpected,
            )
        for key, meta in header["tensors"].items():
            shape = tuple(meta["shape"])
            if key in expected and tuple(expected[key].shape) != shape:
                raise SparsityError(f"{key} has shape {shape} in {path} but {tuple(expected[key].shape)} in the model",
                                    key=key)

    # a file matching the model may decode to as much as the model holds (at up to 8 bytes a value)
    state, masks, grids = read_tensors_and_grids(path, check=check,
                                                 allow_bytes=8 * sum(v.numel() for v in expected.values()))
    modules = dict(model.named_modules())
    owners = {}
    for key in (*masks, *grids):
        fqn, _, pname = key.rpartition(".")
        if fqn not in modules or not isinstance(getattr(modules[fqn], pname, None), torch.nn.Parameter):
            what = "a mask" if key in masks else "a quantization grid"
            raise SparsityError(f"{path} has {what} for {key}, which is not a parameter of the model")
        owners[key] = (modules[fqn], pname)
    with rollback(model, what=f"loading {path}"):  # a layer refusing its tensors undoes the layers before it
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
        for item in list(iter_masks(model)):
            if item.qualified_name not in masks:
                remove_mask(item.module, item.name)  # the file says this weight is dense now
        for key, mask in masks.items():
            module, pname = owners[key]
            set_mask(module, mask, pname)
        for item in list(iter_quant_grids(model)):
            if item.qualified_name not in grids:
                remove_quant_grid(item.module, item.name)  # the file's weights carry no grid
        for key, grid in grids.items():
            module, pname = owners[key]
            set_quant_grid(module, grid.scales, grid.grid, pname, transposed=grid.transposed)
    return model
