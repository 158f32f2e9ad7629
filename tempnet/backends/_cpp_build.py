"""Build and load the C++ extension of the ``"cpp"`` backend (every ``csrc/*.cpp`` in one library).

Each source file registers its ops with ``TORCH_LIBRARY_FRAGMENT(tempnet_cpp, m)``; once the
library is loaded they are called as ``torch.ops.tempnet_cpp.<name>``.

:func:`load_extension` uses the ahead-of-time module ``tempnet._C`` when it is importable
(``TEMPNET_BUILD_CPP=1 pip install .`` builds it, with portable flags). Otherwise it builds the
sources just in time with ninja into a cache directory, once per process:
``$TEMPNET_CPP_BUILD_DIR`` if set, else ``~/.cache/tempnet/cpp-<key>``, where ``<key>`` hashes the
sources, the flags, the torch version and the Python version.

Vector width: the flags follow the CPU capability that ATen itself dispatches to
(``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY`` overrides it): ``AVX2`` and
``AVX512`` builds enable those instruction sets and the matching ``at::vec::Vectorized``
specialisations (exp / tanh through SLEEF in libtorch), anything else builds ATen's portable
vector fallback. No ``-march=native``: the flags, hence the cache key, depend only on the
capability, so a cache directory reused on another CPU of the same capability stays valid.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
from pathlib import Path

import torch

_CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# -ffp-contract=off: no implicit fusion of a*b + c into an FMA, so an expression rounds the same way wherever it
# is written (the contrastive backward recomputes u = s/τ exactly as the forward did); the explicit fmadd
# intrinsics of the kernels are unaffected.
_BASE_CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_loaded: str | None = None


def csrc_dir() -> Path:
    """The directory holding the C++ sources (the installed package ``tempnet.csrc``)."""
    package = importlib.import_module("tempnet.csrc")
    return Path(package.__file__).resolve().parent


def source_files() -> list[Path]:
    """Every ``*.cpp`` under :func:`csrc_dir`, sorted (all of them go into one library)."""
    return sorted(csrc_dir().glob("*.cpp"))


def compile_flags() -> list[str]:
    """Compiler flags of the just-in-time build for this machine's CPU capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    return _BASE_CFLAGS + _CAPABILITY_FLAGS.get(capability, [])


def build_directory(sources: list[Path], cflags: list[str]) -> Path:
    """Cache directory of a build of ``sources`` with ``cflags`` (see the module docstring)."""
    override = os.environ.get("TEMPNET_CPP_BUILD_DIR")
    if override:
        return Path(override)
    digest = hashlib.sha256()
    for path in [*sources, *sorted(csrc_dir().glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cflags + _LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    return Path.home() / ".cache" / "tempnet" / f"cpp-{digest.hexdigest()[:16]}"


def _load_ahead_of_time() -> str | None:
    try:
        module = importlib.import_module("tempnet._C")
    except ImportError:
        return None
    return str(module.__file__)


def _build_just_in_time() -> str:
    from torch.utils.cpp_extension import load

    sources = source_files()
    if not sources:
        raise RuntimeError(f"no C++ sources found in {csrc_dir()}")
    cflags = compile_flags()
    directory = build_directory(sources, cflags)
    directory.mkdir(parents=True, exist_ok=True)
    load(name="tempnet_cpp", sources=[str(path) for path in sources], extra_cflags=cflags,
         extra_ldflags=_LDFLAGS, extra_include_paths=[str(csrc_dir())], build_directory=str(directory),
         is_python_module=False, verbose=os.environ.get("TEMPNET_CPP_VERBOSE") == "1")
    return str(directory)


def load_extension() -> str:
    """Load the tempnet C++ ops (building them on first use); returns where they came from.

    Thread-safe and cached: the build runs at most once per process. A failed build raises an
    exception whose message carries the compiler output (torch's ``RuntimeError``); the next
    call tries again.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load_ahead_of_time() or _build_just_in_time()
        return _loaded
