"""Which layers a pruning call touches: ``include``/``exclude`` by module type or name glob."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import SparsityError

__all__ = ["Target", "select_targets", "DEFAULT_TYPES", "as_spec_list", "matches_spec", "final_classifier"]

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# names of final output layers that are kept dense by default (pruning them hurts most)
_CLASSIFIER_NAMES = ("lm_head", "classifier", "head", "fc_out", "output")

Spec = type | str | Sequence[type | str] | None


@dataclass(frozen=True)
class Target:
    """One prunable parameter: ``fqn`` names the module, ``name`` the parameter on it."""

    fqn: str
    module: nn.Module
    name: str = "weight"

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @property
    def qualified_name(self) -> str:
        return f"{self.fqn}.{self.name}" if self.fqn else self.name


def as_spec_list(spec: Spec) -> list[type | str]:
    if spec is None:
        return []
    if isinstance(spec, (str, type)):
        return [spec]
    return list(spec)


def matches_spec(fqn: str, module: nn.Module, specs: Iterable[type | str]) -> bool:
    for spec in specs:
        if isinstance(spec, type) and isinstance(module, spec):
            return True
        if isinstance(spec, str) and (fnmatch.fnmatchcase(fqn, spec) or fnmatch.fnmatchcase(f"{fqn}.weight", spec)):
            return True
    return False


def final_classifier(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str | None:
    """The name of the model's output layer if it looks like a classifier/lm_head, else None."""
    for fqn, _ in candidates:
        if fqn.split(".")[-1] in _CLASSIFIER_NAMES:
            return fqn
    linears = [fqn for fqn, m in candidates if isinstance(m, nn.Linear)]
    # the last Linear registered is the classifier of a plain feed-forward stack
    return linears[-1] if linears and linears[-1] == candidates[-1][0] and len(candidates) > 1 else None


def select_targets(model: nn.Module, include: Spec = None, exclude: Spec = None) -> list[Target]:
    """The prunable weights of ``model``.

    By default every Linear/Conv1d/Conv2d/Conv3d weight except a final classifier or
    ``lm_head``. ``include`` replaces the default set: module types and fully-qualified-name
    globs (``"encoder.*"``, ``"*.fc1"``); naming the classifier explicitly includes it.
    ``exclude`` removes matches. An ``include`` entry that matches nothing is an error.
    """
    if not isinstance(model, nn.Module):
        raise SparsityError(f"expected an nn.Module, got {type(model).__name__}")
    includes, excludes = as_spec_list(include), as_spec_list(exclude)
    modules = [(fqn, m) for fqn, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    if includes:
        for spec in includes:
            if not any(matches_spec(fqn, m, [spec]) for fqn, m in modules):
                raise SparsityError(
                    f"include pattern {spec!r} matches no module with a weight; names look like "
                    f"{[fqn for fqn, _ in modules[:5]]}",
                    include=spec,
                )
        chosen = [(fqn, m) for fqn, m in modules if matches_spec(fqn, m, includes)]
    else:
        chosen = [(fqn, m) for fqn, m in modules if isinstance(m, DEFAULT_TYPES)]
        classifier = final_classifier(model, chosen)
        chosen = [(fqn, m) for fqn, m in chosen if fqn != classifier]
    chosen = [(fqn, m) for fqn, m in chosen if not matches_spec(fqn, m, excludes)]
    if not chosen:
        raise SparsityError(
            "no layer to prune: the model has no eligible Linear/Conv weight after include/exclude; "
            "pass include=[...] with module types or name globs"
        )
    return [Target(fqn, m) for fqn, m in chosen]
