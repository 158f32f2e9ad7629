"""Fused Triton tempered cross-entropy over a vocabulary (SPEC §1, §1b): ``cross_entropy_rows``.

The forward pass runs :func:`tempnet.kernels._ce_row.ce_rows_kernel`, one program per row, which
computes the row loss, ``lse`` and — when the inputs require grad — the whole per-row gradient
``∂R/∂z`` and ``∂R/∂τ`` at once. The backward pass only scales them by the incoming per-row
gradient ``g`` (the reduction of :mod:`tempnet.functional` happens outside, so backward always
receives a ``(N,)`` gradient).

Memory traffic of the ``(N, V)`` logits: forward reads them twice (pass 1: online max /
sum-exp / entropy terms; pass 2: softmax and gradient) and writes the gradient once — 2 reads
and 1 write, whatever options are on (they are fused into the same passes). Backward is one
in-place scale of the gradient buffer (1 read, 1 write). Without ``requires_grad`` only pass 1
runs (1 read).

In-place option (``opts.inplace_backward``): ∂L/∂z is written into the logits buffer itself
(the ``(N, V)`` tensor passed in, unit column stride), block by block right after pass 2 has
read it, and that buffer is returned as the logits' gradient (scaled in place by ``g``). This
saves the ``(N, V)`` gradient allocation; the caller promises not to read the logits after the
forward call (their values are destroyed, and autograd's version counter is not bumped).
Without it one gradient buffer of the logits' dtype is allocated. Either way backward can run
only once per forward (the buffer is scaled in place); ``retain_graph`` double backward raises.

No host–device synchronisation happens on any path.
"""

from __future__ import annotations

import torch

from tempnet._options import CEOptions, compute_dtype
from tempnet.kernels._ce_row import launch_ce_rows


def class_weight_sum(opts: CEOptions, acc: torch.dtype) -> torch.Tensor | None:
    """``Σ_k w_k`` of the class weights as a 0-d ``acc`` tensor on their device, or ``None``."""
    return None if opts.class_weight is None else opts.class_weight.to(acc).sum()


class _FusedCrossEntropy(torch.autograd.Function):
    """Rows and lse of SPEC §1 / §1b with the gradients precomputed in the forward pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions,
                grad_enabled: bool, block_v: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows = logits.shape[0]
        acc = compute_dtype(logits.dtype)
        want_dz = grad_enabled and ctx.needs_input_grad[0]
        want_dtau = grad_enabled and ctx.needs_input_grad[2]
        rows = torch.empty(n_rows, dtype=acc, device=logits.device)
        lse = torch.empty(n_rows, dtype=acc, device=logits.device)
        dtau = torch.empty(n_rows, dtype=acc, device=logits.device) if want_dtau else None
        grad = None
        if want_dz:
            grad = logits.detach() if opts.inplace_backward else torch.empty(
                logits.shape, dtype=logits.dtype, device=logits.device)
        launch_ce_rows(logits, target, tau, opts, weight_sum=class_weight_sum(opts, acc), rows=rows, lse=lse,
                       dtau=dtau, grad=grad, block_v=block_v)
        ctx.grad_logits, ctx.grad_tau = grad, dtau
        ctx.tau_dtype = tau.dtype
        ctx.mark_non_differentiable(lse)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_lse: torch.Tensor):
        del grad_lse  # lse carries no gradient
        if ctx.grad_logits is None and ctx.grad_tau is None and any(ctx.needs_input_grad):
            raise RuntimeError(
                "tempnet triton cross-entropy: backward ran twice on one forward; its gradient buffer is scaled "
                "in place, so retain_graph=True double backward is not supported — call the loss again"
            )
        grad_logits = grad_tau = None
        if ctx.grad_logits is not None:
            grad_logits = ctx.grad_logits.mul_(grad_rows.unsqueeze(1))
        if ctx.grad_tau is not None:
            grad_tau = (ctx.grad_tau * grad_rows).to(ctx.tau_dtype)
        ctx.grad_logits = ctx.grad_tau = None
        return grad_logits, None, grad_tau, None, None, None


def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions, *, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered cross-entropy, fused (backend protocol of :mod:`tempnet.backends`).

    Args:
        logits: ``(N, V)`` float16 / bfloat16 / float32 / float64, unit column stride, any row
            stride (int64 offsets: ``N · row_stride`` may exceed ``2^31``).
        target: ``(N,)`` int64 in ``[0, V)`` or ``opts.ignore_index``.
        tau: ``(N,)`` floating (a stride-0 view for a scalar temperature), any dtype.
        opts: the options of SPEC §1b; ``opts.inplace_backward`` reuses the logits buffer for
            their gradient (see the module docstring).
        block_v: force the kernel's block over ``V`` (tests); default from the vocabulary size.

    Returns:
        ``(rows, lse)``, ``(N,)`` each in float32 (float64 for float64 logits); ``rows`` is
        differentiable w.r.t. ``logits`` (gradient in the logits' dtype) and ``tau`` (in tau's dtype).
    """
    return _FusedCrossEntropy.apply(logits, target, tau, opts, torch.is_grad_enabled(), block_v)
