"""Fused Triton tempered cross-entropy over a vocabulary (SPEC §1, §1b): ``cross_entropy_rows``.

Both passes of :func:`tempnet.kernels._ce_row.ce_rows_kernel` (one program per row) run once each:

- forward: pass 1 only (one read of the logits) gives the row loss, ``lse`` and ``∂R/∂τ``;
- backward: pass 2 (one read, one write) writes ``g_i · ∂R_i/∂z_i`` with the incoming per-row
  gradient ``g`` fused in (the reduction of :mod:`tempnet.functional` happens outside, so
  backward always receives a ``(N,)`` gradient); ``∂L/∂τ = g ⊙ ∂R/∂τ``.

So the ``(N, V)`` logits cost 2 reads and 1 write in all, whatever options are on (they are
fused into the same passes), and no ``(N, V)`` buffer exists between forward and backward.
Without ``requires_grad`` only pass 1 runs.

In-place option (``opts.inplace_backward``): backward writes ∂L/∂z into the logits buffer itself
(the ``(N, V)`` tensor passed in, unit column stride), block by block right after reading it,
and returns that buffer as the logits' gradient. This saves the ``(N, V)`` gradient allocation;
the caller promises not to read the logits after the loss is computed (their values are
destroyed by backward, and autograd's version counter is not bumped), and backward can run only
once (a second one raises). Without it backward allocates one gradient buffer of the logits'
dtype, and ``retain_graph`` double backward works.

Launch parameters (:func:`tempnet.kernels._ce_row.launch_config`) come from
``benchmarks/gpu_tune.py``. No host–device synchronisation happens on any path.
"""

from __future__ import annotations

import torch

from tempnet._options import CEOptions, compute_dtype
from tempnet.kernels._ce_row import launch_ce_rows


def class_weight_sum(opts: CEOptions, acc: torch.dtype) -> torch.Tensor | None:
    """``Σ_k w_k`` of the class weights as a 0-d ``acc`` tensor on their device, or ``None``."""
    return None if opts.class_weight is None else opts.class_weight.to(acc).sum()


class _FusedCrossEntropy(torch.autograd.Function):
    """Rows and lse of SPEC §1 / §1b: pass 1 in forward, pass 2 (gradient, scale fused) in backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions,
                grad_enabled: bool, block_v: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows = logits.shape[0]
        acc = compute_dtype(logits.dtype)
        want_dtau = grad_enabled and ctx.needs_input_grad[2]
        rows = torch.empty(n_rows, dtype=acc, device=logits.device)
        lse = torch.empty(n_rows, dtype=acc, device=logits.device)
        dtau = torch.empty(n_rows, dtype=acc, device=logits.device) if want_dtau else None
        weight_sum = class_weight_sum(opts, acc)
        launch_ce_rows(logits, target, tau, opts, weight_sum=weight_sum, rows=rows, lse=lse, dtau=dtau,
                       block_v=block_v)
        if grad_enabled and ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, target, tau, lse, weight_sum)
        ctx.opts, ctx.block_v, ctx.grad_tau, ctx.tau_dtype = opts, block_v, dtau, tau.dtype
        ctx.consumed = False
        ctx.mark_non_differentiable(lse)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_lse: torch.Tensor):
        del grad_lse  # lse carries no gradient
        grad_logits = grad_tau = None
        if ctx.needs_input_grad[0]:
            if ctx.consumed and ctx.opts.inplace_backward:
                raise RuntimeError(
                    "tempnet triton cross-entropy: backward ran twice on one forward with inplace_backward=True; the "
                    "first one overwrote the logits with their gradient — call the loss again, or use "
                    "inplace_backward=False for retain_graph=True double backward"
                )
            logits, target, tau, lse, weight_sum = ctx.saved_tensors
            grad_logits = logits.detach() if ctx.opts.inplace_backward else torch.empty(
                logits.shape, dtype=logits.dtype, device=logits.device)
            launch_ce_rows(logits, target, tau, ctx.opts, weight_sum=weight_sum, rows=None, lse=lse, dtau=None,
                           grad=grad_logits, lse_given=True, scale=grad_rows, block_v=ctx.block_v)
            ctx.consumed = True
        if ctx.grad_tau is not None:
            grad_tau = (ctx.grad_tau * grad_rows).to(ctx.tau_dtype)
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
