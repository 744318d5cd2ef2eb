"""Datasets that ship with packages or the machine; nothing is downloaded."""
from .digits import Split, load_digits_split
from .planted import planted_features

__all__ = ["Split", "load_digits_split", "planted_features"]
