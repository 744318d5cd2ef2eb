"""Finding and loading the optional compiled kernels: the one place for the disable flag, the ISA cap and tiles.

Imports no torch (the edge runtime runs on numpy alone), so the extension modules are loaded from their
files rather than through ``sparsetorch.kernels``. Modules that use torch import it before calling
:func:`load`, so the kernels bind to torch's libgomp (one OpenMP thread pool in the process).

* ``SPARSETORCH_DISABLE_EXT=1`` hides every compiled kernel (torch or numpy fallbacks run instead).
* ``SPARSETORCH_ISA=generic|avx2|avx512`` caps the instruction set; call :func:`refresh` after changing it.
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ISAS = ("generic", "avx2", "avx512")
INFERENCE, TRAINING = "_C", "_train"  # the two extensions setup.py builds (csrc/module.cpp, csrc/train_module.cpp)
L2_BUDGET = 768 * 1024  # bytes of a core's L2 the kernels' dense panels may fill
# from this many input rows on, a bitmask weight is unpacked (compiled) into a reused buffer for a dense GEMM
# instead of running the per-row kernel (measured crossover, 2 threads AVX-512; the edge runtime and the
# column layout of activation sparsity)
BITMASK_PREFILL_ROWS = 128
# from this many input rows on, a BitmaskWeight takes the prefill path (the sparse x dense panel kernel or the
# unpacked GEMM, whichever ran faster on its first such call) instead of the per-row kernel: at 32 rows the
# panel kernel beat the per-row one on every layer tried (384-2048 inputs, 50%, 70%, 2:4, fp32 values 1.14-2.33x
# vs 0.73-1.25x dense torch; int8 x int8 1.26-1.86x vs 0.80-1.60x; 2 threads), at 16 not on the int8 x int8 ones
BITMASK_MANY_ROWS = 32


def disabled() -> bool:
    """Whether SPARSETORCH_DISABLE_EXT asks for the fallbacks."""
    return os.environ.get("SPARSETORCH_DISABLE_EXT", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _find(name: str) -> ModuleType | None:
    full = f"{__package__}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    folder = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if not path.is_file():
            continue
        try:  # the module's last name part must stay as built: its init symbol is PyInit_<name>
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (ImportError, OSError):
            return None
        sys.modules[full] = module
        return module
    return None


def load(name: str = INFERENCE) -> ModuleType | None:
    """The compiled extension ``name`` (INFERENCE or TRAINING), or None: not built, or disabled."""
    return None if disabled() else _find(name)


def available(name: str = INFERENCE) -> bool:
    """Whether the extension ``name`` is built and enabled."""
    return load(name) is not None


def _capped(level: int) -> int:
    cap = os.environ.get("SPARSETORCH_ISA")
    return min(level, ISAS.index(cap)) if cap in ISAS else level


@functools.lru_cache(maxsize=None)
def isa_level(name: str = INFERENCE) -> int:
    """Index into ISAS the kernels run at: the best this CPU has, capped by SPARSETORCH_ISA (cached)."""
    module = load(name)
    return _capped(module.best_isa()) if module is not None else 0


def best_isa(name: str = INFERENCE) -> str | None:
    """"avx512", "avx2" or "generic" (None without the extension)."""
    return ISAS[isa_level(name)] if available(name) else None


def cpu_has(isa: str, name: str = INFERENCE) -> bool:
    """Whether this CPU runs ``isa`` (ignoring the cap); False without the extension."""
    module = load(name)
    return module is not None and module.best_isa() >= ISAS.index(isa)


def refresh() -> None:
    """Forget the cached ISA level (after changing SPARSETORCH_ISA)."""
    isa_level.cache_clear()


@functools.lru_cache(maxsize=256)
def batch_tile(in_features: int, panels: int = 1) -> int:
    """Batch tile in 16-column vectors: the widest whose ``panels`` dense panels (in x 16*tile fp32 each)
    fit in the L2 budget. One panel of X^T for a layer; two ping-pong panels for a fused chain."""
    for tile in (4, 2):
        if panels * in_features * 16 * tile * 4 <= L2_BUDGET:
            return tile
    return 1
