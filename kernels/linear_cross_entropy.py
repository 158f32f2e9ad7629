"""Fused linear + tempered cross-entropy (SPEC §1, §1b): ``linear_cross_entropy_rows``.

``z = hidden @ weight.T (+ bias)`` is never held for all rows at once. Both passes walk the rows
in chunks of ``C`` rows and reuse one ``(C, V)`` logits buffer in the accumulation dtype (float32 for
half-precision inputs, so the logits are never rounded to bfloat16 before ``/ τ``):

- forward: ``z_chunk = hidden_chunk @ weight.T (+ bias)`` (cuBLAS), then the fused row kernel
  (:mod:`tempnet.kernels._ce_row`, pass 1 only) gives the rows, ``lse`` and ``∂R/∂τ``;
- backward: the chunk's logits are recomputed, the kernel's pass 2 (``lse`` given, per-row scale
  ``g`` fused) overwrites them in place with ``g ⊙ ∂R/∂z``, and
  ``grad_hidden_chunk = dz @ weight``, ``grad_weight += dz.T @ hidden_chunk``,
  ``grad_bias += Σ_rows dz``.

Chunk size rule (:func:`rows_per_chunk`): ``C = ⌊budget / (V · 4)⌋`` rows (8 for float64), rounded
down to a multiple of 128 when at least 128 (GEMM tiles), clamped to ``[1, N]``; ``budget`` is
:data:`CHUNK_BYTES` (256 MiB) on the CPU and :data:`GPU_CHUNK_BYTES` (1 GiB) on a GPU, where every
chunk also costs one read and one write of the float32 ``grad_weight`` accumulator, so fewer,
larger chunks pay. The logits buffer never exceeds the budget (except for a single row wider
than it). Peak extra memory is that buffer, plus for float16 / bfloat16 inputs its copy in the
input dtype (the GEMM operand of the gradient products) and a float32 ``(V, D)`` accumulator of
``grad_weight`` (on the CPU a ``(⌊budget / (D · 4)⌋, D)`` slice of the per-chunk
``dz.T @ hidden`` product instead of the copy); it scales with the chunk, never with ``N · V``.

On a GPU the half-precision products run on cuBLAS with float32 output where it matters:
``torch.mm(..., out_dtype=float32)`` writes the chunk logits straight into the float32 buffer,
and ``torch.addmm(grad_weight, dz.T, hidden_chunk, out_dtype=float32)`` accumulates
``grad_weight`` in float32 in the GEMM's epilogue; ``grad_hidden`` is one half-precision GEMM
(float32 accumulation inside, rounded once).
"""

from __future__ import annotations

import torch

from tempnet._options import CEOptions, compute_dtype
from tempnet.kernels._ce_row import launch_ce_rows
from tempnet.kernels.cross_entropy import class_weight_sum

CHUNK_BYTES = 256 * 2**20
GPU_CHUNK_BYTES = 2**30
_HALF = (torch.float16, torch.bfloat16)


def rows_per_chunk(n_rows: int, vocab: int, element_size: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a ``(rows, vocab)`` buffer of ``element_size`` bytes fits ``budget``."""
    rows = budget // (vocab * element_size)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n_rows, rows))


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``out (C, V) = hidden (C, D) @ weight.T (+ bias)``, ``out`` in the accumulation dtype.

    Half-precision inputs give float32 logits: rounding them to bfloat16 before ``/ τ`` would
    move ``u`` by up to ``|z| · 2⁻⁸ / τ``. On CUDA the GEMM accumulates in float32 and writes
    float32 directly; elsewhere the operands are upcast.
    """
    if out.dtype != hidden.dtype:
        if hidden.is_cuda:
            torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
        else:
            torch.mm(hidden.to(out.dtype), weight.t().to(out.dtype), out=out)
        return out if bias is None else out.add_(bias.to(out.dtype))
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _gradient_products(dz: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor,
                       grad_hidden_chunk: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """``grad_hidden_chunk = dz @ weight`` and ``grad_weight += dz.T @ hidden_chunk``.

    ``dz (C, V)`` is in the accumulation dtype; for half-precision inputs it is rounded to their
    dtype once per chunk (GPU GEMM operand) and ``grad_weight`` is a float32 accumulator.
    """
    if dz.dtype == weight.dtype:
        if grad_hidden_chunk is not None:
            torch.mm(dz, weight, out=grad_hidden_chunk)
        if grad_weight is not None:
            grad_weight.addmm_(dz.t(), hidden_chunk)
        return
    if dz.is_cuda:
        dz_half = dz.to(weight.dtype)
        if grad_hidden_chunk is not None:
            torch.mm(dz_half, weight, out=grad_hidden_chunk)
        if grad_weight is not None:
            torch.addmm(grad_weight, dz_half.t(), hidden_chunk, out_dtype=grad_weight.dtype, out=grad_weight)
        return
    if grad_hidden_chunk is not None:
        grad_hidden_chunk.copy_(torch.mm(dz, weight.to(dz.dtype)))
    if grad_weight is not None:
        # float32 products by V-slices, so the temporary stays within the chunk budget.
        vocab, dim = grad_weight.shape
        step = max(1, CHUNK_BYTES // (dim * dz.element_size()))
        hidden_acc = hidden_chunk.to(dz.dtype)
        for start in range(0, vocab, step):
            grad_weight[start:start + step].addmm_(dz[:, start:start + step].t(), hidden_acc)


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
            logits = _logits_into(buffer[:end - start], hidden[start:end], weight, bias_cast)
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
            grad_weight = torch.zeros((vocab, dim), dtype=acc if weight.dtype in _HALF else weight.dtype,
                                      device=weight.device)
        grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_bias else None
        if need_hidden or need_weight or need_bias:
            bias_cast = None if bias is None else bias.to(hidden.dtype)
            weight_sum = class_weight_sum(ctx.opts, acc)
            chunk = ctx.chunk
            buffer = torch.empty(min(chunk, n_rows), vocab, dtype=acc, device=hidden.device)
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                hidden_chunk = hidden[start:end]
                dz = _logits_into(buffer[:end - start], hidden_chunk, weight, bias_cast)
                launch_ce_rows(dz, target[start:end], tau[start:end], ctx.opts, weight_sum=weight_sum, rows=None,
                               lse=lse[start:end], dtau=None, grad=dz, lse_given=True, scale=grad_rows[start:end],
                               block_v=ctx.block_v)
                _gradient_products(dz, hidden_chunk, weight, grad_hidden[start:end] if need_hidden else None,
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
