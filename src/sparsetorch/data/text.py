"""Text from the Python standard library's own ``.py`` sources (always on the machine, nothing
downloaded): a byte-level corpus, and English sentences from its docstrings, each with a deterministic
split by file."""
from __future__ import annotations

import ast
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SparsityError


@dataclass(frozen=True)
class TextSplit:
    """Train and validation bytes as uint8 tensors, and the files each came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: int
    val_files: int


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted order (tests and site-packages excluded)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def load_stdlib_text(max_bytes: int = 8_000_000, val_every: int = 10, root: str | Path | None = None) -> TextSplit:
    """Bytes of the sorted stdlib sources up to ``max_bytes``; every ``val_every``-th file is validation."""
    files = stdlib_files(root)
    if not files:
        raise SparsityError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % val_every == val_every - 1 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return TextSplit(as_tensor(train), as_tensor(val), len(train), len(val))


def random_windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes: ``[count, length]`` int64."""
    if data.numel() < length:
        raise SparsityError(f"text has {data.numel()} bytes, fewer than a window of {length}")
    starts = torch.randint(0, data.numel() - length + 1, (count,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


@dataclass(frozen=True)
class SentenceSplit:
    """English sentences from the stdlib's docstrings: calibration and evaluation come from disjoint
    files, and no sentence appears in both."""

    calibration: list[str]
    evaluation: list[str]
    calibration_files: int
    evaluation_files: int


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_HINTS = (">>>", "::", "==", "->", "()", "[]", "{}", "__", "\\", "|")


def docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of one Python source, in source order ([] if it does
    not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [doc for n in nodes if (doc := ast.get_docstring(n, clean=True))]


def prose_sentences(doc: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of ``min_words``..``max_words`` words from a docstring's prose paragraphs; code
    examples, tables and argument lists are left out."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t")) or line.lstrip().startswith((">>>", "-", "*", "+", "=")) for line in lines):
            continue  # an indented block, a doctest, a list or a table: not running prose
        text = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            if not min_words <= len(words) <= max_words or not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if any(h in sentence for h in _CODE_HINTS) or sum(w.strip(".,;:()'\"").isalpha() for w in words) < 0.8 * len(words):
                continue  # mostly identifiers or symbols
            out.append(sentence)
    return out


def stdlib_sentences(eval_every: int = 5, min_words: int = 5, max_words: int = 60,
                     root: str | Path | None = None) -> SentenceSplit:
    """Sentences from the docstrings of the sorted stdlib ``.py`` files; every ``eval_every``-th file
    goes to evaluation, the rest to calibration. Deterministic for a given Python installation; each
    sentence is kept once (at its first file), so the two sets never share a sentence."""
    files = stdlib_files(root)
    if not files:
        raise SparsityError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    seen: set[str] = set()
    calib, evaluation, counts = [], [], [0, 0]
    for i, path in enumerate(files):
        held_out = i % eval_every == eval_every - 1
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found = [s for doc in docstrings(source) for s in prose_sentences(doc, min_words, max_words)]
        fresh = [s for s in dict.fromkeys(found) if s not in seen]
        seen.update(fresh)
        (evaluation if held_out else calib).extend(fresh)
        counts[held_out] += bool(fresh)
    return SentenceSplit(calib, evaluation, counts[0], counts[1])
