"""Handing freed memory back to the operating system between the steps of one-shot pruning."""
from __future__ import annotations

import ctypes

_TRIM = None


def return_freed_memory() -> None:
    """``malloc_trim(0)``: give the pages of freed tensors back to the OS (glibc keeps freed heap memory below its
    32 MB mmap threshold for reuse, and tensors of other sizes fragment it, so a process's RSS would carry the
    last layer's or block's temporaries into the next one's peak). A no-op where the C library is not glibc."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)
