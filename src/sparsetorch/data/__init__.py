"""Datasets that ship with packages or the machine; nothing is downloaded."""
from .digits import Split, load_digits_split
from .planted import planted_features
from .pretrained import load_minilm, mean_pooled_embeddings
from .text import SentenceSplit, stdlib_sentences

__all__ = ["Split", "load_digits_split", "planted_features", "load_minilm", "mean_pooled_embeddings",
           "SentenceSplit", "stdlib_sentences"]
