"""Build of the optional compiled kernels (sparsetorch.kernels._C).

Everything else is declared in pyproject.toml. The extension is optional: if the compiler, OpenMP or
pybind11 is missing, or compilation fails, the install still succeeds and sparsetorch falls back to
torch's own sparse kernels. Set SPARSETORCH_NO_BUILD_EXT=1 to skip the build on purpose.

No -march=native: per-function target attributes (csrc/kernels_*.cpp) give AVX2 and AVX-512 paths chosen
at run time, so the same build runs on any x86-64 CPU.
"""
from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

SOURCES = ["csrc/module.cpp", "csrc/dispatch.cpp", "csrc/chain.cpp", "csrc/kernels_generic.cpp",
           "csrc/kernels_avx2.cpp", "csrc/kernels_avx512.cpp",
           "csrc/decode_dispatch.cpp", "csrc/decode_vnni.cpp", "csrc/decode_q8_avx2.cpp"]
# rebuild when these change
DEPENDS = ["csrc/isa.h", "csrc/kernels.h", "csrc/dispatch.h", "csrc/chain.h", "csrc/kernels_impl.inc", "csrc/parallel.h",
           "csrc/decode.h", "csrc/decode_impl.inc", "csrc/decode_columns.inc", "csrc/attention.inc", "csrc/hsum.h"]
# sparse training kernels (sparsetorch.kernels._train): a second, independent extension
TRAIN_SOURCES = ["csrc/train_module.cpp", "csrc/train_dispatch.cpp", "csrc/train_generic.cpp",
                 "csrc/train_avx2.cpp", "csrc/train_avx512.cpp"]
TRAIN_DEPENDS = ["csrc/isa.h", "csrc/train_kernels.h", "csrc/train_dispatch.h", "csrc/train_impl.inc", "csrc/parallel.h"]


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the package works without the extension."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, etc.
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(f"WARNING: sparsetorch's compiled kernels were not built ({exc}); "
              "falling back to torch sparse kernels.", file=sys.stderr)


def extensions():
    if os.environ.get("SPARSETORCH_NO_BUILD_EXT") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: pybind11 not found; sparsetorch's compiled kernels are skipped.", file=sys.stderr)
        return []
    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/openmp", "/std:c++17"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp without libomp; build single-threaded
        compile_args, link_args = ["-O3", "-std=c++17"], []
    else:
        compile_args = ["-O3", "-fopenmp", "-std=c++17", "-Wno-psabi", "-fno-math-errno"]
        link_args = ["-fopenmp"]
    return [Pybind11Extension("sparsetorch.kernels._C", SOURCES, extra_compile_args=compile_args,
                              extra_link_args=link_args, cxx_std=17, include_dirs=["csrc"],
                              depends=DEPENDS),
            Pybind11Extension("sparsetorch.kernels._train", TRAIN_SOURCES, extra_compile_args=compile_args,
                              extra_link_args=link_args, cxx_std=17, include_dirs=["csrc"],
                              depends=TRAIN_DEPENDS)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
