#!/usr/bin/env bash
# Build the compiled kernels (_C and _train) with AddressSanitizer into a temporary copy of src/ (the normal
# .so files are left alone) and run the kernel, fused-chain and training-kernel tests against them (issue #20).
#   benchmarks/asan_kernels.sh [PYTHON] [extra pytest args...]     e.g. benchmarks/asan_kernels.sh .venv/bin/python
# Python leaks by design, so detect_leaks=0; any heap/stack overflow aborts the test run with a report.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-python}; shift || true
TMP=$(mktemp -d /tmp/sparsetorch_asan.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cp -r "$ROOT/src" "$TMP/src"
rm -f "$TMP"/src/sparsetorch/kernels/_C*.so "$TMP"/src/sparsetorch/kernels/_train*.so
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# pybind11's headers: from the pybind11 package, else the copy torch ships (torch/include/pybind11)
INC=$("$PY" -c '
import sysconfig
try:
    import pybind11; inc = pybind11.get_include()
except ImportError:
    import importlib.util, os; inc = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "include")
print(inc, sysconfig.get_paths()["include"])')
FLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1 -fopenmp -std=c++17 -Wno-psabi -fno-math-errno -fPIC -shared"
build() {  # name, sources...
  local name=$1; shift
  g++ $FLAGS -I"$ROOT/csrc" $(for d in $INC; do echo "-I$d"; done) "${@/#/$ROOT/}" \
      -o "$TMP/src/sparsetorch/kernels/$name$SUFFIX"
}
build _C csrc/module.cpp csrc/dispatch.cpp csrc/chain.cpp csrc/kernels_generic.cpp csrc/kernels_avx2.cpp csrc/kernels_avx512.cpp &
build _train csrc/train_module.cpp csrc/train_dispatch.cpp csrc/train_generic.cpp csrc/train_avx2.cpp csrc/train_avx512.cpp &
wait %1 && wait %2
echo "built ASan kernels in $TMP/src/sparsetorch/kernels"
cd "$ROOT"
# the tests must load the ASan copies, not the normal build
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$TMP/src" "$PY" -c '
import torch, sparsetorch, sparsetorch.kernels._C as c, sparsetorch.kernels._train as t, sys
print("kernels loaded:", c.__file__, t.__file__)
sys.exit(0 if c.__file__.startswith(sys.argv[1]) and t.__file__.startswith(sys.argv[1]) else 1)' "$TMP"
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
  PYTHONPATH="$TMP/src" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fused.py \
  tests/test_sparse_training.py "$@"
# and the hostile-file regressions, whose subprocesses inherit LD_PRELOAD / PYTHONPATH
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
  PYTHONPATH="$TMP/src" "$PY" -m pytest -q -p no:cacheprovider tests/test_hostile_files.py -k "edge or check" "$@"
