"""Training-time sparsity methods, each a ``Sparsifier`` stepped after ``optimizer.step()``."""
from .base import Sparsifier

__all__ = ["Sparsifier"]
