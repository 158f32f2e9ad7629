"""``contrastive_side`` of the C++ backend: one side of the SPEC §2 loss, fused on the CPU.

The similarities ``s = anchors @ candidates.T`` are produced in ``(block_anchors, block_candidates)``
tiles and reduced by an online log-sum-exp (``csrc/contrastive.cpp``), so memory stays
``O((b + B)·D + tile)``: the forward keeps four per-anchor statistics (the softmax's shift and
log-sum, the positive's ``p − 1`` and ``∂L/∂τ``, all formed from shifted values), the backward recomputes
the tiles (one sweep over anchor blocks for the anchor gradient, one over candidate blocks for the
candidate gradient, each thread owning whole blocks); the temperature gradient needs no sweep.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from tempnet.backends._cpp_build import load_extension

BLOCK_ANCHORS = 128
BLOCK_CANDIDATES = 256


class _ContrastiveSide(torch.autograd.Function):
    """Autograd wrapper of ``tempnet_cpp::contrastive_forward`` / ``contrastive_backward``."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, offset: int,
                rho: float | None, block_anchors: int, block_candidates: int) -> torch.Tensor:
        loss, stats = torch.ops.tempnet_cpp.contrastive_forward(
            anchors, candidates, tau, offset, rho, block_anchors, block_candidates
        )
        ctx.save_for_backward(anchors, candidates, tau, stats)
        ctx.config = (offset, rho, block_anchors, block_candidates)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        anchors, candidates, tau, stats = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grads = torch.ops.tempnet_cpp.contrastive_backward(grad_loss, anchors, candidates, tau, stats, *ctx.config,
                                                           mask)
        return *(grad if needed else None for grad, needed in zip(grads, mask, strict=True)), None, None, None, None


def contrastive_side(
    anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, *, offset: int, rho: float | None,
    block_anchors: int = BLOCK_ANCHORS, block_candidates: int = BLOCK_CANDIDATES,
) -> torch.Tensor:
    """Per-anchor contrastive loss of SPEC §2 (the backend protocol of :mod:`tempnet.backends`).

    Args:
        anchors: ``(b, D)`` float64 / float32 / bfloat16 / float16 CPU tensor, any strides.
        candidates: ``(B, D)``, same dtype; the positive of anchor ``i`` is candidate ``offset + i``.
        tau: ``(b,)`` floating, > 0 (a stride-0 view for a scalar temperature).
        offset: index of anchor 0's positive among the candidates; ``offset + b <= B``.
        rho: ``None`` for InfoNCE (positive in the denominator), else the DRO radius ρ (negatives
            only, ``B >= 2``).
        block_anchors, block_candidates: tile shape of the similarity matrix.

    Returns:
        ``(b,)`` losses in float32 (float64 for float64 features), differentiable w.r.t.
        ``anchors``, ``candidates`` and ``tau``; each gradient has its input's dtype.
    """
    load_extension()
    return _ContrastiveSide.apply(anchors, candidates, tau, offset, rho, block_anchors, block_candidates)
