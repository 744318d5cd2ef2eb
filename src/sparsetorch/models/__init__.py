"""Small built-in models for demos, tests and benchmarks, defined in code (nothing is downloaded)."""
from .mlp import MLP, SmallCNN

__all__ = ["MLP", "SmallCNN"]
