"""Determinism and thread safety.

- Every backend and op gives bitwise-identical outputs (loss, ``lse``) and gradients when called
  twice on the same inputs in the same process (same thread count). The fused backends never
  reduce across threads in a data-dependent order: the C++ kernels give each thread whole rows
  (cross-entropy) or whole anchor / candidate blocks (contrastive), and the Triton kernels give
  each program whole rows or blocks, with no atomics.
- The C++ backend called from several Python threads at once (each with its own inputs) gives
  exactly the results of serial calls: the kernels keep no global mutable state.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hardening_utils import (
    BACKENDS,
    assert_bitwise_equal,
    run_contrastive,
    run_cross_entropy,
    run_linear_cross_entropy,
)

from tempnet.backends._cpp_build import load_extension


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ce_inputs(seed: int, rows: int, vocab: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    gen = _gen(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[::5] = -100
    tau = (0.2 + torch.rand(rows, generator=gen)).requires_grad_()
    options = {"rho": 0.7, "softcap": 8.0, "label_smoothing": 0.1, "z_loss": 1e-3,
               "weight": 0.5 + torch.rand(vocab, generator=gen), "reduction": "none", "return_lse": True}
    return (logits, target, tau), options


def _linear_inputs(seed: int, rows: int, vocab: int, dim: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    gen = _gen(seed)
    hidden = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=gen)
    tau = (0.2 + torch.rand(rows, generator=gen)).requires_grad_()
    bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_()
    return (hidden, weight, target, tau), {"bias": bias, "label_smoothing": 0.05, "return_lse": True}


def _contrastive_inputs(seed: int, batch: int, dim: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    gen = _gen(seed)
    image, text = (torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(dtype)
                   .requires_grad_() for _ in range(2))
    tau_image = (0.02 + 0.1 * torch.rand(batch, generator=gen)).requires_grad_()
    tau_text = torch.tensor(0.05, requires_grad=True)
    return (image, text, tau_image, tau_text), {"rho": 0.5, "reduction": "none"}


# (rows, vocab, dim, batch): several C++ threads, row blocks and tiles; tiny for the interpreter.
SIZES = {"torch": (64, 700, 24, 48), "cpp": (300, 2500, 48, 300), "triton": (5, 40, 8, 9)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_inputs_give_bitwise_identical_results(backend, dtype):
    rows, vocab, dim, batch = SIZES[backend]
    cases = [
        (run_cross_entropy, *_ce_inputs(1, rows, vocab, dtype)),
        (run_linear_cross_entropy, *_linear_inputs(2, rows, vocab, dim, dtype)),
        (run_contrastive, *_contrastive_inputs(3, batch, dim, dtype)),
    ]
    for run, args, kwargs in cases:
        first = run(backend, *args, **kwargs)
        second = run(backend, *args, **kwargs)
        assert_bitwise_equal(first, second, f"{backend} {run.__name__} {dtype}")


def _cpp_call(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """One C++ call (forward and backward) of op ``kind`` on inputs derived from ``seed``."""
    if kind == "ce":
        args, kwargs = _ce_inputs(seed, 96, 1500, torch.float32)
        return run_cross_entropy("cpp", *args, **kwargs)
    if kind == "linear":
        args, kwargs = _linear_inputs(seed, 96, 700, 32, torch.bfloat16)
        return run_linear_cross_entropy("cpp", *args, **kwargs)
    args, kwargs = _contrastive_inputs(seed, 160, 32, torch.float32)
    return run_contrastive("cpp", *args, **kwargs)


def test_cpp_backend_is_thread_safe():
    """4 Python threads × 12 calls (three ops, different inputs) equal the same calls made serially."""
    load_extension()
    calls = [(kind, seed) for seed in range(4) for kind in ("ce", "linear", "contrastive")]
    serial = [_cpp_call(kind, seed) for kind, seed in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda call: _cpp_call(*call), calls))
    for (kind, seed), expected, got in zip(calls, serial, concurrent, strict=True):
        assert_bitwise_equal(expected, got, f"cpp {kind} seed {seed} from a thread")
