"""Storage formats for one tensor: encode to named flat tensors plus JSON-able metadata, decode back.

Each format is a pair of pure functions registered in ``FORMATS``. ``encode`` returns
``(parts, meta)``: ``parts`` maps a suffix to a tensor, ``meta`` holds what decoding needs
(shape, dtype, ...). ``decode(parts, meta)`` returns ``(dense_tensor, mask_or_None)``
and must validate everything it reads (files may be corrupted or hostile).

Formats: ``dense``, ``bitmask`` (1 bit per weight), ``csr`` (narrow chunk-local indices),
``gapmask`` (gap-coded positions, near the entropy of a random mask), ``nm`` (N:M group codes),
``bsr`` (block bits). Value codecs (``fp32`` exact, ``fp16``/``bf16``/``int8``/``int4`` lossy; int8/int4
codes of a weight on its quantization grid exact, see ``grid_codec``) wrap any format.

Other libraries' checkpoints: ``load_compressed_tensors`` reads llm-compressor's compressed-tensors
``sparse-bitmask`` / ``sparse-24-bitmask`` folders (module ``compressed_tensors``, imported on first use).
"""
from __future__ import annotations

from .._lazy import lazy_attributes
from .format_registry import (FORMATS, SAVE_VALUES, VALUE_CODECS, Format, decode, encode,  # noqa: F401
                              register_format, squeeze, stored_bytes)
from . import dense as _dense
from . import bitmask as _bitmask
from . import csr as _csr
from . import gapmask as _gapmask
from . import nm as _nm
from . import bsr as _bsr

__all__ = ["FORMATS", "VALUE_CODECS", "SAVE_VALUES", "Format", "encode", "decode", "register_format", "squeeze", "stored_bytes",
           "load_compressed_tensors", "read_compressed_tensors", "save_compressed_tensors"]

__getattr__, __dir__ = lazy_attributes(__name__, {
    "load_compressed_tensors": "compressed_tensors:load_compressed_tensors",
    "read_compressed_tensors": "compressed_tensors:read_compressed_tensors",
    "save_compressed_tensors": "compressed_tensors:save_compressed_tensors",
})
