"""Cross-entropy ops of the C++ backend: autograd wrappers of ``csrc/cross_entropy.cpp``.

Implements ``cross_entropy_rows`` and ``linear_cross_entropy_rows`` of the backend protocol
(:mod:`tempnet.backends`). The forward pass computes the losses and, when an input needs a
gradient, the unscaled per-row gradients in the same sweep; the backward pass only scales them
by the incoming per-row gradient ``g``, in place. A second backward through the same graph
(``retain_graph=True``) recomputes instead, so gradients handed out earlier are never modified.

Memory (``cross_entropy_rows``): one ``(N, V)`` gradient buffer in the logits' dtype, none with
``opts.inplace_backward`` (the gradient overwrites the logits during the forward pass; such a
graph supports a single backward pass).
"""

from __future__ import annotations

import math

import torch

from tempnet._options import CEOptions, compute_dtype
from tempnet.backends._cpp_build import load_extension

# Chunk rule of the linear op: a chunk of logits holds about as many elements as ``hidden``
# (N·D), and at least this many rows so that the chunk GEMMs stay efficient.
MIN_CHUNK_ROWS = 256


def linear_chunk_rows(n_rows: int, dim: int, vocab: int) -> int:
    """Rows per chunk of ``linear_cross_entropy_rows``: ``min(N, max(256, ceil(N·D / V)))``.

    The reusable chunk buffer thus holds at most ``max(N·D, 256·V)`` elements, whatever ``N``.
    """
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, math.ceil(n_rows * dim / vocab))))


def _accumulation_inputs(tau: torch.Tensor, opts: CEOptions, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``tau`` and the class weights in the accumulation dtype (no copy when already there)."""
    tau_acc = tau.detach().to(dtype)
    weight = opts.class_weight
    if weight is not None:
        weight = weight.detach().to(dtype).contiguous()
    return tau_acc, weight


def _option_args(opts: CEOptions) -> tuple:
    return opts.rho, opts.ignore_index, opts.softcap, float(opts.label_smoothing), float(opts.z_loss)


def _is_all(values: torch.Tensor, value: float) -> bool:
    return values.numel() == 0 or bool((values == value).all())


def _uniform_scale(g: torch.Tensor) -> float | None:
    """The common value of the per-row gradient ``g``, or ``None`` if the rows differ."""
    if g.numel() == 0:
        return 1.0
    first = float(g[0])
    return first if g.stride(0) == 0 or _is_all(g, first) else None


class _CrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions
                ) -> tuple[torch.Tensor, torch.Tensor]:
        acc = compute_dtype(logits.dtype)
        tau_acc, weight = _accumulation_inputs(tau, opts, acc)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if opts.inplace_backward else torch.empty(logits.shape, dtype=logits.dtype)
        rows, lse, dtau = torch.ops.tempnet_cpp.ce_forward(
            logits, target, tau_acc, weight, None, grad, *_option_args(opts))
        ctx.mark_non_differentiable(lse)
        ctx.opts, ctx.tau_dtype, ctx.consumed = opts, tau.dtype, False
        ctx.save_for_backward(None if opts.inplace_backward else logits, target, tau_acc, weight, grad, dtau)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_lse: torch.Tensor):
        logits, target, tau_acc, weight, grad, dtau = ctx.saved_tensors
        g = grad_rows.to(dtau.dtype)
        grad_logits = grad_tau = None
        if ctx.needs_input_grad[0]:
            if not ctx.consumed:
                if not _is_all(g, 1.0):
                    torch.ops.tempnet_cpp.scale_rows_(grad, g)
                grad_logits = grad
            elif logits is None:
                raise RuntimeError("tempered_cross_entropy(..., inplace_backward=True) supports a single backward "
                                   "pass: its gradient overwrote the logits. Use inplace_backward=False to "
                                   "backpropagate through the graph more than once.")
            else:
                grad_logits = torch.empty(logits.shape, dtype=logits.dtype)
                torch.ops.tempnet_cpp.ce_forward(logits, target, tau_acc, weight, g, grad_logits,
                                                 *_option_args(ctx.opts))
            ctx.consumed = True
        if ctx.needs_input_grad[2]:
            grad_tau = (dtau * g).to(ctx.tau_dtype)
        return grad_logits, None, grad_tau, None


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered CE (protocol of :mod:`tempnet.backends`), fused in C++.

    Args:
        logits: ``(N, V)`` float64 / float32 / bfloat16 / float16, unit column stride.
        target: ``(N,)`` int64.
        tau: ``(N,)`` floating (stride 0 for a scalar temperature).
        opts: options of SPEC §1b; with ``inplace_backward`` the gradient overwrites ``logits``.

    Returns:
        ``(rows, lse)``, ``(N,)`` each, float64 for float64 logits else float32.
    """
    load_extension()
    return _CrossEntropyRows.apply(logits, target, tau, opts)


class _LinearCrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                tau: torch.Tensor, opts: CEOptions) -> tuple[torch.Tensor, torch.Tensor]:
        acc = compute_dtype(hidden.dtype)
        tau_acc, class_weight = _accumulation_inputs(tau, opts, acc)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        chunk = linear_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
        rows, lse, dtau, *grads = torch.ops.tempnet_cpp.linear_ce(
            hidden, weight, bias, target, tau_acc, class_weight, None, mask, chunk, *_option_args(opts))
        ctx.mark_non_differentiable(lse)
        ctx.opts, ctx.tau_dtype, ctx.mask, ctx.chunk = opts, tau.dtype, mask, chunk
        ctx.grads = grads
        ctx.save_for_backward(hidden, weight, bias, target, tau_acc, class_weight, dtau)
        return rows, lse

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _grad_lse: torch.Tensor):
        hidden, weight, bias, target, tau_acc, class_weight, dtau = ctx.saved_tensors
        g = grad_rows.to(dtau.dtype)
        grads = [None, None, None]
        if any(ctx.mask):
            scale = _uniform_scale(g)
            grads = ctx.grads
            if scale is None or grads is None:  # per-row g, or a second backward: recompute the chunks
                _, _, _, *grads = torch.ops.tempnet_cpp.linear_ce(
                    hidden, weight, bias, target, tau_acc, class_weight, g if scale is None else None,
                    ctx.mask, ctx.chunk, *_option_args(ctx.opts))
            if scale is not None and scale != 1.0:  # a uniform g scales the gradients in place
                grads = [grad.mul_(scale) if grad is not None else grad for grad in grads]
            ctx.grads = None
        grads = [grad if wanted else None for grad, wanted in zip(grads, ctx.mask, strict=True)]
        grad_tau = (dtau * g).to(ctx.tau_dtype) if ctx.needs_input_grad[4] else None
        return grads[0], grads[1], grads[2], None, grad_tau, None


def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              target: torch.Tensor, tau: torch.Tensor, opts: CEOptions
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered CE of ``hidden @ weight.T + bias`` (protocol of :mod:`tempnet.backends`).

    Args:
        hidden: ``(N, D)``; weight: ``(V, D)`` (same dtype); bias: ``(V,)`` or ``None``.
        target, tau, opts: as :func:`cross_entropy_rows`.

    Rows go through the C++ op ``linear_ce`` :func:`linear_chunk_rows` at a time, so memory is
    bounded by one chunk of logits; the gradients w.r.t. ``hidden``, ``weight`` and ``bias`` are
    accumulated chunk by chunk in the forward pass (float32 for half-precision inputs) and
    scaled by ``g`` in the backward pass, or recomputed there when ``g`` differs between rows.

    Returns:
        ``(rows, lse)``, ``(N,)`` each, float64 for float64 inputs else float32.
    """
    load_extension()
    return _LinearCrossEntropyRows.apply(hidden, weight, bias, target, tau, opts)
