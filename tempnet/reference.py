"""The PyTorch reference: SPEC §1, §1b and §2 written once, in plain differentiable PyTorch.

This is ``backend="torch"`` and the single source of truth every other backend is tested
against. It materialises the ``(N, V)`` logits and the ``(b, B)`` similarities; gradients come
from autograd. It follows the backend protocol of :mod:`tempnet.backends`.
"""

from __future__ import annotations

import math

import torch

from tempnet._options import CEOptions, compute_dtype


def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered cross-entropy (SPEC §1, §1b).

    Args:
        logits: ``(N, V)`` float16 / bfloat16 / float32 / float64.
        target: ``(N,)`` int64, in ``[0, V)`` or ``opts.ignore_index``.
        tau: ``(N,)`` floating, > 0 (a stride-0 view for a scalar temperature).
        opts: the options of SPEC §1b.

    Returns:
        ``(rows, lse)``, both ``(N,)`` in float32 (float64 for float64 logits): the per-row loss
        with class weights, smoothing and z-loss folded in (0 at ignored rows), and the per-row
        ``lse(u)`` of the capped, tempered logits (no gradient; 0 at ignored rows).
    """
    dtype = compute_dtype(logits.dtype)
    vocab = logits.shape[-1]
    valid = target != opts.ignore_index
    # Ignored rows see neutral inputs so that they get exactly zero gradient, even if non-finite.
    z = torch.where(valid[:, None], logits.to(dtype), 0.0)
    t = torch.where(valid, tau.to(dtype), 1.0)
    safe_target = torch.where(valid, target, 0)
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    # Shift each row by its (constant) max before dividing by τ: u − max(u) is formed without
    # cancellation, so ℓ and its τ-gradient stay accurate when |z|/τ is large.
    row_max = z.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    u = (z - shift) / t[:, None]  # u_k − max_k z_k / τ
    lse_shifted = torch.logsumexp(u, dim=-1)
    lse = lse_shifted + shift.squeeze(1) / t  # lse of the unshifted z / τ
    nll_target = lse_shifted - u.gather(1, safe_target[:, None]).squeeze(1)  # ℓ_y = lse(u) − u_y

    eps = opts.label_smoothing
    if opts.class_weight is not None:
        w = opts.class_weight.to(dtype)
        w_target = w[safe_target]
        w_total = w.sum()
    else:
        w = None
        w_target = torch.ones_like(nll_target)
        w_total = torch.tensor(float(vocab), dtype=dtype, device=logits.device)
    rows = (1.0 - eps) * w_target * nll_target
    if eps > 0:
        nll_all = lse_shifted[:, None] - u  # ℓ_k for every class k
        smooth = (nll_all * w).sum(-1) if w is not None else nll_all.sum(-1)
        rows = rows + (eps / vocab) * smooth
    if opts.rho is not None:
        # SPEC §1: L_k = τ ℓ_k + τ (ρ − log V); the weights of the ℓ-mixture also weigh the shift.
        mixture_weight = (1.0 - eps) * w_target + (eps / vocab) * w_total
        rows = t * rows + t * (opts.rho - math.log(vocab)) * mixture_weight
    if opts.z_loss:
        rows = rows + opts.z_loss * lse.square()
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, rows, zero), torch.where(valid, lse.detach(), zero)


def linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    tau: torch.Tensor, opts: CEOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row tempered CE of ``z = hidden @ weight.T (+ bias)``; shapes ``(N, D)``, ``(V, D)``, ``(V,)``.

    Returns ``(rows, lse)`` as :func:`cross_entropy_rows`. Materialises the ``(N, V)`` logits.
    """
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return cross_entropy_rows(logits, target, tau, opts)


def contrastive_side(
    anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, *, offset: int, rho: float | None
) -> torch.Tensor:
    """One side of the contrastive loss of SPEC §2, per anchor.

    Anchor ``i`` (row of ``anchors``, ``(b, D)``) is scored against every row ``j`` of
    ``candidates`` (``(B, D)``), ``s_ij = <a_i, c_j>``; its positive is candidate ``offset + i``.

    - ``rho=None``: ``lse_j(s_ij / τ_i) − s_i,pos / τ_i`` (positive in the denominator).
    - ``rho=ρ``: ``τ_i log((1/(B−1)) Σ_{j≠pos} exp((s_ij − s_i,pos)/τ_i)) + ρ τ_i``.

    Returns ``(b,)`` in float32 (float64 for float64 features).
    """
    dtype = compute_dtype(anchors.dtype)
    n_anchor, n_cand = anchors.shape[0], candidates.shape[0]
    sim = anchors.to(dtype) @ candidates.to(dtype).T
    pos_index = torch.arange(n_anchor, device=anchors.device) + offset
    positive = sim.gather(1, pos_index[:, None]).squeeze(1)
    t = tau.to(dtype)
    # lse_j(s_ij/τ) − s_i,pos/τ = lse_j((s_ij − s_i,pos)/τ): the shifted form avoids cancellation.
    shifted = (sim - positive[:, None]) / t[:, None]
    if rho is None:
        return torch.logsumexp(shifted, dim=-1)
    is_positive = torch.arange(n_cand, device=anchors.device)[None, :] == pos_index[:, None]
    shifted = shifted.masked_fill(is_positive, float("-inf"))
    return t * (torch.logsumexp(shifted, dim=-1) - math.log(n_cand - 1)) + rho * t
