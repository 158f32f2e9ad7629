"""Fused linear + tempered cross-entropy (SPEC §1, §1b): ``linear_cross_entropy_rows``.

``z = hidden @ weight.T (+ bias)`` is never held for all rows at once. Both passes walk the rows
in chunks of ``C`` rows and reuse one ``(C, V)`` logits buffer in the accumulation dtype (float32 for
half-precision inputs, so the logits are never rounded to bfloat16 before ``/ τ``):

- forward: ``z_chunk = hidden_chunk @ weight.T (+ bias)`` (cuBLAS), then the fused row kernel
  (:mod:`tempnet.kernels._ce_row`, pass 1 only) gives the rows, ``lse`` and ``∂R/∂τ``;
- backward: the chunk's logits are recomputed, the kernel's pass 2 (``lse`` given, per-row scale
  ``g`` fused) writes ``dz = g ⊙ ∂R/∂z`` (over them in place, or on a GPU with half-precision
  inputs into a buffer of the input dtype, the GEMM operand), and
  ``grad_hidden_chunk = dz @ weight``, ``grad_weight += dz.T @ hidden_chunk``,
  ``grad_bias += Σ_rows dz``.

Chunks and GEMMs: :mod:`tempnet.kernels._chunked_gemm`. The budget of the logits buffer is
``CHUNK_BYTES`` (256 MiB) on the CPU and ``GPU_CHUNK_BYTES`` (1 GiB) on a GPU, where every chunk
also costs one read and one write of the float32 ``grad_weight`` accumulator, so fewer, larger
chunks pay. Peak extra memory is that buffer, plus for float16 / bfloat16 inputs a float32
``(V, D)`` accumulator of ``grad_weight`` and, on a GPU, the chunk gradient in the input dtype
(on the CPU a ``(⌊budget / (D · 4)⌋, D)`` slice of the per-chunk ``dz.T @ hidden`` product); it
scales with the chunk, never with ``N · V``.
"""

from __future__ import annotations

import torch

from tempnet._options import CEOptions, compute_dtype
from tempnet.kernels._ce_row import launch_ce_rows
from tempnet.kernels._chunked_gemm import (
    CHUNK_BYTES,
    GPU_CHUNK_BYTES,
    HALF,
    gradient_dtype,
    gradient_products,
    rows_per_chunk,
    scores_into,
)
from tempnet.kernels.cross_entropy import class_weight_sum


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Rows and lse of ``hidden @ weight.T + bias``, recomputing logits chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                tau: torch.Tensor, opts: CEOptions, grad_enabled: bool, chunk_rows: int | None,
                block_v: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        acc = compute_dtype(hidden.dtype)
        device = hidden.device
        bias_cast = None if bias is None else bias.to(hidden.dtype)
        budget = GPU_CHUNK_BYTES if hidden.is_cuda else CHUNK_BYTES
        chunk = chunk_rows or rows_per_chunk(n_rows, vocab, torch.finfo(acc).bits // 8, budget)
        rows = torch.empty(n_rows, dtype=acc, device=device)
        lse = torch.empty(n_rows, dtype=acc, device=device)
        dtau = torch.empty(n_rows, dtype=acc, device=device) if grad_enabled and ctx.needs_input_grad[4] else None
        weight_sum = class_weight_sum(opts, acc)
        buffer = torch.empty(min(chunk, n_rows), vocab, dtype=acc, device=device)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            logits = scores_into(buffer[:end - start], hidden[start:end], weight, bias_cast)
            launch_ce_rows(logits, target[start:end], tau[start:end], opts, weight_sum=weight_sum,
                           rows=rows[start:end], lse=lse[start:end],
                           dtau=None if dtau is None else dtau[start:end], block_v=block_v)
        ctx.save_for_backward(hidden, weight, bias, target, tau, lse)
        ctx.opts, ctx.chunk, ctx.block_v, ctx.dtau = opts, chunk, block_v, dtau
        ctx.mark_non_differentiable(lse)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_lse: torch.Tensor):
        del grad_lse  # lse carries no gradient
        hidden, weight, bias, target, tau, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows, dim = hidden.shape
        vocab = weight.shape[0]
        acc = compute_dtype(hidden.dtype)
        grad_hidden = torch.empty((n_rows, dim), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros((vocab, dim), dtype=acc if weight.dtype in HALF else weight.dtype,
                                      device=weight.device)
        grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_bias else None
        if need_hidden or need_weight or need_bias:
            bias_cast = None if bias is None else bias.to(hidden.dtype)
            weight_sum = class_weight_sum(ctx.opts, acc)
            chunk = ctx.chunk
            buffer = torch.empty(min(chunk, n_rows), vocab, dtype=acc, device=hidden.device)
            grad_dtype = gradient_dtype(hidden, acc)
            dz_buffer = buffer if grad_dtype == acc else torch.empty(buffer.shape, dtype=grad_dtype,
                                                                     device=hidden.device)
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                hidden_chunk = hidden[start:end]
                logits = scores_into(buffer[:end - start], hidden_chunk, weight, bias_cast)
                dz = dz_buffer[:end - start]
                launch_ce_rows(logits, target[start:end], tau[start:end], ctx.opts, weight_sum=weight_sum, rows=None,
                               lse=lse[start:end], dtau=None, grad=dz, lse_given=True, scale=grad_rows[start:end],
                               block_v=ctx.block_v)
                gradient_products(dz, hidden_chunk, weight, grad_hidden[start:end] if need_hidden else None,
                                  grad_weight)
                if need_bias:
                    grad_bias += dz.sum(0, dtype=acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        grad_tau = None if ctx.dtau is None else (ctx.dtau * grad_rows).to(tau.dtype)
        return grad_hidden, grad_weight, grad_bias, None, grad_tau, None, None, None, None


def linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, tau: torch.Tensor,
    opts: CEOptions, *, chunk_rows: int | None = None, block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered CE of ``hidden @ weight.T (+ bias)`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)``; weight: ``(V, D)`` (same dtype: float16 / bfloat16 / float32 /
            float64); bias: ``(V,)`` or ``None``.
        target: ``(N,)`` int64; tau: ``(N,)`` floating, possibly a stride-0 view.
        opts: the options of SPEC §1b (``inplace_backward`` is irrelevant: the logits are internal).
        chunk_rows: rows per chunk; default :func:`rows_per_chunk` (see the module docstring).
        block_v: force the row kernel's block over ``V`` (tests).

    Returns:
        ``(rows, lse)``, ``(N,)`` each in float32 (float64 for float64 inputs); ``rows`` is
        differentiable w.r.t. ``hidden``, ``weight``, ``bias`` and ``tau``, each gradient in its
        input's dtype.
    """
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, tau, opts, torch.is_grad_enabled(),
                                          chunk_rows, block_v)
