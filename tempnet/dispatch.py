"""The one place that decides which backend runs an op, and says why.

``backend="auto"`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it
builds, and the PyTorch reference otherwise. An explicit backend that cannot run raises
:class:`BackendUnavailableError` saying why and how to get it. Set ``TEMPNET_LOG_BACKEND=1`` (or
the ``tempnet.dispatch`` logger to DEBUG) to see every decision.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
_logger = logging.getLogger(__name__)
if os.environ.get("TEMPNET_LOG_BACKEND") == "1":
    logging.basicConfig()
    _logger.setLevel(logging.DEBUG)
_warned_cpp_fallback = False


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says how to fix it."""


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend: its ``name``, the ``module`` implementing the protocol, and ``reason``."""

    name: str
    module: ModuleType
    reason: str


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_problem(device: torch.device) -> str | None:
    """``None`` if the Triton backend can run on ``device``, else why not and what to do."""
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())):
        return (f"backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
                f"tempnet is imported); got {device.type} tensors. Use backend='auto', 'cpp' or 'torch'")
    try:
        importlib.import_module("triton")
    except ImportError as error:  # pragma: no cover - triton ships with the pinned torch
        return f"backend='triton' needs the triton package ({error}); pip install triton"
    return None


def _load_cpp() -> ModuleType:
    """Import the C++ backend, building the extension on first use (raises on failure)."""
    module = importlib.import_module("tempnet.backends.cpp")
    module.load_extension()
    return module


def choose_backend(requested: str, device: torch.device) -> BackendChoice:
    """Resolve ``requested`` (one of :data:`BACKENDS`) for tensors on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        choice = BackendChoice("torch", importlib.import_module("tempnet.reference"), "requested explicitly")
    elif requested == "triton":
        problem = _triton_problem(device)
        if problem is not None:
            raise BackendUnavailableError(problem)
        choice = BackendChoice("triton", importlib.import_module("tempnet.kernels"), "requested explicitly")
    elif requested == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='cpp' runs on CPU tensors; got {device.type} tensors. Use backend='auto' or 'triton'"
            )
        try:
            module = _load_cpp()
        except Exception as error:
            raise BackendUnavailableError(
                f"backend='cpp' could not build or load the C++ extension (needs a C++ compiler and ninja; "
                f"pip install ninja). Compiler output:\n{error}"
            ) from error
        choice = BackendChoice("cpp", module, "requested explicitly")
    else:
        choice = _choose_auto(device)
    _logger.debug("tempnet backend %s on %s: %s", choice.name, device, choice.reason)
    return choice


def _choose_auto(device: torch.device) -> BackendChoice:
    global _warned_cpp_fallback
    reference = importlib.import_module("tempnet.reference")
    if device.type == "cuda":
        problem = _triton_problem(device)
        if problem is None:
            return BackendChoice("triton", importlib.import_module("tempnet.kernels"), "auto: CUDA tensors")
        return BackendChoice("torch", reference, f"auto: Triton unavailable ({problem})")
    if device.type == "cpu":
        if os.environ.get("TEMPNET_DISABLE_CPP") == "1":
            return BackendChoice("torch", reference, "auto: TEMPNET_DISABLE_CPP=1")
        try:
            return BackendChoice("cpp", _load_cpp(), "auto: CPU tensors, C++ extension built")
        except Exception as error:
            if not _warned_cpp_fallback:
                first_line = str(error).splitlines()[0] if str(error) else repr(error)
                warnings.warn(
                    f"tempnet: the C++ extension did not build ({first_line}); "
                    f"falling back to the PyTorch reference. backend='cpp' shows the full compiler output.",
                    RuntimeWarning, stacklevel=3,
                )
                _warned_cpp_fallback = True
            return BackendChoice("torch", reference, "auto: C++ extension unavailable")
    return BackendChoice("torch", reference, f"auto: no fused backend for {device.type} tensors")
