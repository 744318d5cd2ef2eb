"""Lazy package attributes: public names are imported on first use so that importing stays cheap.

Used by ``sparsetorch`` and its subpackages; imports nothing heavy (the edge runtime relies on it).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable


def lazy_attributes(package: str, names: dict[str, str], submodules: Iterable[str] = ()) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``.

    ``names`` maps a public name to ``"module:attribute"`` (or just ``"module"`` when the
    attribute has the public name); ``submodules`` are imported when accessed as attributes.
    """
    subs = set(submodules)

    def __getattr__(name: str):
        if name in names:
            module, _, attr = names[name].partition(":")
            relative = module if module.startswith(".") else f".{module}"  # "..x" reaches a sibling package
            value = getattr(importlib.import_module(relative, package), attr or name)
            vars(sys.modules[package])[name] = value  # resolved once
            return value
        if name in subs:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names) | subs)

    return __getattr__, __dir__
