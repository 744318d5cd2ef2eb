"""Storage formats for one tensor: encode to named flat tensors plus JSON-able metadata, decode back.

Each format is a pair of pure functions registered in ``FORMATS``. ``encode`` returns
``(parts, meta)``: ``parts`` maps a suffix to a tensor, ``meta`` holds what decoding needs
(shape, dtype, ...). ``decode(parts, meta)`` returns ``(dense_tensor, mask_or_None)``
and must validate everything it reads (files may be corrupted or hostile).
"""
from __future__ import annotations

from .registry import FORMATS, Format, decode, encode, register_format  # noqa: F401
from . import dense as _dense  # noqa: F401  (registers)
from . import bitmask as _bitmask  # noqa: F401  (registers)

__all__ = ["FORMATS", "Format", "encode", "decode", "register_format"]
