"""The fused per-row Triton kernel of the tempered cross-entropy (SPEC §1, §1b) and its launcher.

One program owns one row of logits ``z (V,)`` and streams it in blocks of ``BLOCK_V``:

- pass 1 (one read): online ``m = max u``, ``s = Σ exp(u − m)``, ``b = Σ exp(u − m)(u − m)``
  (only when ``∂/∂τ`` is wanted) and ``S = Σ w_k u_k`` (only with label smoothing), with
  ``u = softcap(z) / τ``; then the row loss, ``lse`` and ``∂R/∂τ`` in closed form
  (notes/CE_GRADIENTS.md): ``E = Σ p u = m + b/s`` and ``H(p) = log s − b/s``;
- pass 2 (one read, one write, only when ``∂/∂z`` is wanted): ``p = exp(u − lse)`` and
  ``∂R/∂z``, optionally times a per-row scale, stored in the dtype of the gradient buffer (which
  may be the logits buffer itself).

With ``LSE_GIVEN`` pass 1 is skipped and ``lse`` is read from ``lse_ptr`` (the backward of the
linear op, which recomputes the logits and only needs pass 2). Every option is a
``tl.constexpr`` flag, so options that are off compile away. Row offsets are int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tempnet._options import CEOptions
from tempnet.dispatch import triton_interpreter_enabled


@triton.jit
def _softcap(z, cap, inv_cap):
    """``(cap·tanh(z/cap), tanh(z/cap))``; tanh through ``exp`` so ±inf saturate to ±1.

    One ``exp`` and one division per element. On an H200 the rational tanh of the C++ kernel
    (eight FMAs and a division) made the softcapped row slower, not faster: all options on
    took 2.19× the time of all options off against 1.72× with this form
    (benchmarks/results/cuda-h200-2026-11-26*.md).
    """
    th = 1.0 - 2.0 / (tl.exp(2.0 * z * inv_cap) + 1.0)
    return cap * th, th


@triton.jit
def _as(x, ACC: tl.constexpr):
    """A float64 scalar argument (a Python float under the interpreter) as an ``ACC`` scalar."""
    return (tl.full([], 1.0, tl.float64) * x).to(ACC)


@triton.jit
def ce_rows_kernel(
    z_ptr, z_row_stride, dz_ptr, dz_row_stride,
    target_ptr, tau_ptr, tau_stride, weight_ptr, weight_sum_ptr, scale_ptr, scale_stride,
    rows_ptr, lse_ptr, dtau_ptr,
    V, ignore_index,
    rho_shift_arg: tl.float64, cap_arg: tl.float64, eps_arg: tl.float64, z_loss_arg: tl.float64,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    DRO: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    Z_LOSS: tl.constexpr, LSE_GIVEN: tl.constexpr, GRAD_Z: tl.constexpr, GRAD_TAU: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    one = tl.full([], 1.0, ACC)
    zero = tl.zeros([], ACC)
    vocab = one * V
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    tau = tl.where(valid, tl.load(tau_ptr + row * tau_stride).to(ACC), one)
    inv_tau = one / tau
    z_row = z_ptr + row * z_row_stride
    cap = _as(cap_arg, ACC)
    inv_cap = one / cap
    eps = _as(eps_arg, ACC)
    z_loss = _as(z_loss_arg, ACC)
    rho_shift = _as(rho_shift_arg, ACC)  # ρ − log V

    # Row constants of CE_GRADIENTS.md: w_y, W̄ and B = (1−ε)·w_y + (ε/V)·W̄.
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe).to(ACC)
        w_bar = tl.load(weight_sum_ptr).to(ACC)
    else:
        w_y = one
        w_bar = vocab
    if SMOOTH:
        t_y = (one - eps) * w_y
        t_s = eps / vocab
        big_b = t_y + t_s * w_bar
    else:
        t_y = w_y
        big_b = w_y

    if LSE_GIVEN:
        lse = tl.where(valid, tl.load(lse_ptr + row).to(ACC), zero)
    else:
        m = tl.full([], float("-inf"), ACC)
        s = zero
        b = zero
        smooth_sum = zero
        v_end = tl.where(valid, V, 0)  # ignored rows read nothing
        for start in range(0, v_end, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
            if SOFTCAP:
                z, _ = _softcap(z, cap, inv_cap)
            u = tl.where(mask, z * inv_tau, float("-inf"))
            m_new = tl.maximum(m, tl.max(u, 0))
            m_safe = tl.where(m_new == float("-inf"), zero, m_new)  # all −inf so far: shift by 0
            alpha = tl.exp(m - m_safe)
            e = tl.exp(u - m_safe)
            if GRAD_TAU:
                # b ← e^{m−m'}·(b + (m − m')·s) + Σ e·(u − m'); the wheres keep −inf·0 (first block,
                # masked or −inf lanes) from ever being formed.
                shift = tl.where(s > 0, m - m_safe, zero) * s
                b = alpha * (b + shift) + tl.sum(e * tl.where(e > 0, u - m_safe, zero), 0)
            s = s * alpha + tl.sum(e, 0)
            m = m_new
            if SMOOTH:
                u_in = tl.where(mask, u, zero)
                if HAS_WEIGHT:
                    u_in = u_in * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                smooth_sum += tl.sum(u_in, 0)
        m = tl.where(valid, m, zero)
        s = tl.where(valid, s, one)
        lse = m + tl.log(s)
        z_y = tl.load(z_row + y_safe, mask=valid, other=0.0).to(ACC)
        if SOFTCAP:
            z_y, _ = _softcap(z_y, cap, inv_cap)
        u_y = z_y * inv_tau

        # Row loss C = (1−ε)·w_y·(lse − u_y) + (ε/V)·(W̄·lse − S), then the DRO and z-loss terms.
        loss = t_y * (lse - u_y)
        if SMOOTH:
            loss += t_s * (w_bar * lse - smooth_sum)
        if DRO:
            loss = tau * (loss + rho_shift * big_b)
        if Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(rows_ptr + row, tl.where(valid, loss, zero))
        tl.store(lse_ptr + row, tl.where(valid, lse, zero))

        if GRAD_TAU:
            mean_u = m + b / s  # E = Σ p_k u_k
            if DRO:
                dtau = big_b * (tl.log(s) - b / s + rho_shift)  # B·(H(p) + ρ − log V)
                if Z_LOSS:
                    dtau -= 2.0 * z_loss * lse * mean_u * inv_tau
            else:
                core = t_y * (mean_u - u_y)
                if SMOOTH:
                    core += t_s * (w_bar * mean_u - smooth_sum)
                if Z_LOSS:
                    core += 2.0 * z_loss * lse * mean_u
                dtau = -core * inv_tau
            tl.store(dtau_ptr + row, tl.where(valid, dtau, zero))

    if GRAD_Z:
        # ∂R/∂c_k = (a·p_k − t_y·1[k=y] − t_s·w_k)·out with a = B + 2λ·lse (÷τ in DRO mode)
        # and out = 1/τ (plain) or 1 (DRO), times the per-row scale; then the softcap chain rule.
        a = big_b
        if Z_LOSS:
            a += 2.0 * z_loss * lse * (inv_tau if DRO else one)
        out = one if DRO else inv_tau
        if HAS_SCALE:
            out = out * tl.load(scale_ptr + row * scale_stride).to(ACC)
        out = tl.where(valid, out, zero)
        lse_safe = tl.where(valid, lse, zero)
        dz_row = dz_ptr + row * dz_row_stride
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask & valid, other=0.0).to(ACC)
            if SOFTCAP:
                z, th = _softcap(z, cap, inv_cap)
            p = tl.exp(z * inv_tau - lse_safe)
            g = a * p - tl.where(cols == y_safe, t_y, zero)
            if SMOOTH:
                if HAS_WEIGHT:
                    g -= t_s * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC)
                else:
                    g -= t_s
            g = g * out
            if SOFTCAP:
                g = g * (one - th * th)
            tl.store(dz_row + cols, tl.where(valid, g, zero).to(dz_ptr.dtype.element_ty), mask=mask)


def launch_config(vocab: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``vocab`` classes.

    ``BLOCK_V`` is the power of two covering the row, capped at 4096 on a GPU (1024 under the
    interpreter), so any ``V`` is streamed in a bounded number of registers; 4 warps up to 4096
    columns. On an H200 (bfloat16, N = 16384, V = 128256, both passes) 4096 × 4 warps moved
    3.8 TB/s against 3.5 for 16384 × 16 (benchmarks/results/gpu_tune-h200-2026-11-26.json).
    ``block_v`` overrides it (tests use it to force multi-block rows); ``num_warps`` overrides the
    warp count (``benchmarks/gpu_tune.py`` sweeps both).
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), 1024 if triton_interpreter_enabled() else 4096)
    if num_warps is None:
        num_warps = 4 if block_v <= 4096 else (8 if block_v <= 8192 else 16)
    return block_v, num_warps


@dataclass
class RowOutputs:
    """What :func:`launch_ce_rows` filled in: ``rows``/``lse`` ``(N,)``; ``dtau (N,)`` or ``None``."""

    rows: torch.Tensor | None
    lse: torch.Tensor
    dtau: torch.Tensor | None


def launch_ce_rows(
    logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, opts: CEOptions, *,
    weight_sum: torch.Tensor | None, rows: torch.Tensor | None, lse: torch.Tensor, dtau: torch.Tensor | None,
    grad: torch.Tensor | None = None, lse_given: bool = False, scale: torch.Tensor | None = None,
    block_v: int | None = None, num_warps: int | None = None,
) -> None:
    """Run :func:`ce_rows_kernel` on ``logits (N, V)`` (unit column stride, any row stride).

    Args:
        target, tau: ``(N,)``; ``tau`` may be a stride-0 view.
        weight_sum: ``Σ_k w_k`` as a 0-d tensor when ``opts.class_weight`` is set, else ``None``.
        rows, lse, dtau: ``(N,)`` contiguous outputs in the accumulation dtype (``rows`` and
            ``dtau`` may be ``None`` when not wanted); with ``lse_given`` ``lse`` is an input.
        grad: ``(N, V)`` buffer with unit column stride that receives ``∂R/∂z`` (may be
            ``logits`` itself), or ``None`` to skip pass 2.
        scale: ``(N,)`` per-row factor applied to ``∂R/∂z`` (any stride), or ``None``.
        block_v, num_warps: forced ``BLOCK_V`` and warp count (see :func:`launch_config`).
    """
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return
    acc = lse.dtype
    block, num_warps = launch_config(vocab, block_v, num_warps)
    weight = opts.class_weight
    dummy = lse
    ce_rows_kernel[(n_rows,)](
        logits, logits.stride(0), dummy if grad is None else grad, 0 if grad is None else grad.stride(0),
        target, tau, tau.stride(0), dummy if weight is None else weight, dummy if weight_sum is None else weight_sum,
        dummy if scale is None else scale, 0 if scale is None else scale.stride(0),
        dummy if rows is None else rows, lse, dummy if dtau is None else dtau,
        vocab, opts.ignore_index,
        0.0 if opts.rho is None else opts.rho - math.log(vocab), 1.0 if opts.softcap is None else opts.softcap,
        opts.label_smoothing, opts.z_loss,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_V=block,
        DRO=opts.rho is not None, SOFTCAP=opts.softcap is not None, SMOOTH=opts.label_smoothing > 0,
        HAS_WEIGHT=weight is not None, Z_LOSS=opts.z_loss > 0, LSE_GIVEN=lse_given, GRAD_Z=grad is not None,
        GRAD_TAU=dtau is not None, HAS_SCALE=scale is not None,
        num_warps=num_warps,
    )
