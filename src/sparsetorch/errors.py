"""The one exception type sparsetorch raises for user errors, and its warning category."""
from __future__ import annotations


class SparsityError(ValueError):
    """A user error: bad input to a sparsetorch function.

    The message says what was wrong and how to fix it. ``context`` carries the
    offending values (layer name, shape, argument) for programs that inspect it.
    """

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context = context


class SparsityWarning(UserWarning):
    """Something was adjusted for the user (e.g. a layer kept at its minimum density)."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise ``SparsityError``."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise SparsityError(f"{name} must be a number in [0, 1), got {sparsity!r}", **{name: sparsity}) from None
    if not 0.0 <= value < 1.0:
        raise SparsityError(
            f"{name} must lie in [0, 1), got {value}; e.g. 0.9 keeps 10% of the weights "
            "(1.0 would remove every weight)",
            **{name: sparsity},
        )
    return value
