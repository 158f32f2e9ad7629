#!/usr/bin/env bash
# Run the C++ backend's tests under AddressSanitizer (out-of-bounds reads/writes, use after free).
#
# Usage: scripts/asan_cpp.sh [extra pytest args]     (not part of CI: slow, needs gcc's libasan)
#
# What it does:
#   1. builds csrc/*.cpp with -fsanitize=address -fno-omit-frame-pointer -g (on top of the usual
#      flags of tempnet/backends/_cpp_build.py) into a separate directory, $ASAN_BUILD_DIR
#      (default build/asan-cpp), so the normal just-in-time cache is never touched;
#   2. runs the C++ tests (tests/test_cpp_*.py and the "cpp" cases of the hardening tests) with that
#      build. Python itself is not instrumented, so the ASan runtime is LD_PRELOADed (it must be the
#      first library loaded), together with libstdc++ (ASan's __cxa_throw interceptor needs it at
#      start-up, or the first C++ exception, e.g. a TORCH_CHECK, aborts); leak detection is off
#      (CPython and torch keep allocations alive at exit on purpose), and any ASan report aborts
#      the run with a non-zero exit status.
#
# A small pytest plugin, written into the build directory, swaps the flags and the build directory
# of tempnet.backends._cpp_build before the first load_extension() call.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
build_dir=${ASAN_BUILD_DIR:-build/asan-cpp}
mkdir -p "$build_dir"
build_dir=$(cd "$build_dir" && pwd)
libasan=$(${CXX:-g++} -print-file-name=libasan.so)
libstdcxx=$(${CXX:-g++} -print-file-name=libstdc++.so)
if [ ! -e "$libasan" ]; then
  echo "asan_cpp.sh: libasan.so not found (install gcc's libasan)" >&2
  exit 2
fi

cat > "$build_dir/tempnet_asan_plugin.py" <<'EOF'
"""pytest plugin: build and load the tempnet C++ ops with AddressSanitizer."""
import os

from tempnet.backends import _cpp_build

_cpp_build._BASE_CFLAGS = [*_cpp_build._BASE_CFLAGS, "-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
_cpp_build._LDFLAGS = [*_cpp_build._LDFLAGS, "-fsanitize=address"]
os.environ["TEMPNET_CPP_BUILD_DIR"] = os.environ["TEMPNET_ASAN_BUILD_DIR"]


def pytest_configure(config):
    print(f"tempnet ASan build: {_cpp_build.load_extension()}")
EOF

export TEMPNET_ASAN_BUILD_DIR="$build_dir"
export TRITON_INTERPRET=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1:verify_asan_link_order=0}
export PYTHONPATH="$build_dir${PYTHONPATH:+:$PYTHONPATH}"
# The build-cache test checks the default cache keys, which this script overrides on purpose.
LD_PRELOAD="$libasan $libstdcxx" "$python" -m pytest -q -p tempnet_asan_plugin -p no:cacheprovider \
  tests/test_cpp_cross_entropy.py tests/test_cpp_contrastive.py \
  tests/test_extremes.py tests/test_determinism_concurrency.py tests/test_properties.py \
  -k "cpp and not build_is_cached" "$@"
