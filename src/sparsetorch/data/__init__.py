"""Datasets that ship with packages or the machine; nothing is downloaded."""
from .digits import Split, load_digits_split

__all__ = ["Split", "load_digits_split"]
