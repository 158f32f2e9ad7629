"""Fused Triton kernels for one side of the contrastive loss of SPEC §2 (flash-style).

:func:`contrastive_side` scores ``b`` anchors against ``B`` candidates without ever holding the
``(b, B)`` similarity matrix: every program owns a block of anchors and streams candidate tiles,
computing ``s = anchors @ candidates.T`` tile by tile with ``tl.dot`` and keeping an online
log-sum-exp per anchor. The forward pass stores three ``(b,)`` statistics (loss, ``lse``, and
``∂L/∂τ``); the backward pass recomputes the similarity tiles twice, once per anchor block for
``∂/∂anchors`` and once per candidate block for ``∂/∂candidates`` (no atomics). Memory is
``O((b + B)·D)``.

With ``u_ij = s_ij / τ_i`` and ``p_i`` the softmax of ``u_i`` over the candidate set (all
candidates for InfoNCE, the negatives ``j ≠ pos`` for the DRO loss), the per-anchor gradients are

- InfoNCE: ``∂L_i/∂s_ij = (p_ij − 1[j=pos]) / τ_i``, ``∂L_i/∂τ_i = −(Σ_j p_ij u_ij − u_i,pos) / τ_i``;
- DRO:     ``∂L_i/∂s_ij = p_ij − 1[j=pos]``,         ``∂L_i/∂τ_i = H(p_i) − log(B−1) + ρ``,

so the backward kernels only need ``G_ij = c_i (p_ij − 1[j=pos])`` with ``c_i = g_i/τ_i`` or
``g_i`` (``g`` the incoming per-anchor gradient). ``Σ_j p_ij u_ij`` is accumulated online as
``A = Σ_j exp(u_ij − m) (u_ij − m)`` next to ``l = Σ_j exp(u_ij − m)``, so ``H(p) = log l − A/l``
never subtracts two large numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tempnet._options import compute_dtype
from tempnet.dispatch import triton_interpreter_enabled

# Floor of the running maximum: finite, so a tile whose entries are all masked (e.g. only the
# positive) gives exp(-inf - floor) = 0 instead of exp(-inf + inf) = NaN.
_MAX_FLOOR = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes: ``block_m`` anchors × ``block_n`` candidates per similarity tile, reduced over
    ``block_d`` features at a time; the backward kernels write ``block_d_out`` feature columns of
    the gradient per program. On a GPU every size must be a power of two ≥ 16."""

    block_m: int
    block_n: int
    block_d: int
    block_d_out: int
    num_warps: int = 4


def default_tiles(dim: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """Tile sizes for features of width ``dim``: whole feature rows in one chunk up to 128 wide."""
    block_d = min(max(triton.next_power_of_2(dim), 16), 128)
    if device.type != "cuda":
        return Tiles(32, 32, block_d, block_d)
    if dtype == torch.float64:
        return Tiles(32, 32, min(block_d, 64), min(block_d, 64))
    if dtype in (torch.float16, torch.bfloat16):
        # Best of benchmarks/gpu_tune.py on an H200 (B = 16384, D = 768, bfloat16): 103 TFLOP/s
        # against 79 for 64 × 64 tiles (benchmarks/results/gpu_tune-h200-2026-11-26.json).
        return Tiles(128, 128, min(block_d, 64), block_d, num_warps=8)
    return Tiles(64, 64, min(block_d, 64), block_d, num_warps=8 if block_d >= 128 else 4)


@triton.jit
def _similarity_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim, stride_a, stride_c,
                     ACC_TY: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``s[m, n] = <a_rows[m], c_cols[n]>`` for one ``(BLOCK_M, BLOCK_N)`` tile, 0 where masked."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TY)
    for d0 in range(0, dim, BLOCK_D):
        feat = d0 + tl.arange(0, BLOCK_D)
        feat_mask = feat < dim
        a = tl.load(a_ptr + rows[:, None] * stride_a + feat[None, :],
                    mask=row_mask[:, None] & feat_mask[None, :], other=0.0)
        c = tl.load(c_ptr + cols[:, None] * stride_c + feat[None, :],
                    mask=col_mask[:, None] & feat_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC_TY)
            c = c.to(ACC_TY)
        s = tl.dot(a, tl.trans(c), s, input_precision="ieee", out_dtype=ACC_TY)
    return s


@triton.jit
def _grad_tile(s, inv_tau, lse, coef, rows, cols, col_mask, offset, DRO: tl.constexpr):
    """``G = c_i (p_ij − 1[j = pos_i])`` for one tile (module docstring); 0 outside the candidates."""
    is_pos = cols[None, :] == (rows + offset)[:, None]
    keep = col_mask[None, :]
    if DRO:
        keep = keep & (cols[None, :] != (rows + offset)[:, None])
    p = tl.where(keep, tl.exp(s * inv_tau[:, None] - lse[:, None]), 0.0)
    return coef[:, None] * (p - tl.where(is_pos, 1.0, 0.0))


@triton.jit
def _forward_kernel(a_ptr, c_ptr, tau_ptr, loss_ptr, lse_ptr, dtau_ptr, n_anchor, n_cand, dim, offset,
                    stride_a, stride_c, stride_tau,
                    DRO: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    acc_ty = loss_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_anchor
    tau = tl.load(tau_ptr + rows * stride_tau, mask=row_mask, other=1.0).to(acc_ty)
    inv_tau = 1.0 / tau
    pos = rows + offset
    m = tl.full((BLOCK_M,), _MAX_FLOOR, dtype=acc_ty)
    l = tl.zeros((BLOCK_M,), dtype=acc_ty)
    a_stat = tl.zeros((BLOCK_M,), dtype=acc_ty)
    s_pos = tl.zeros((BLOCK_M,), dtype=acc_ty)
    for n0 in range(0, n_cand, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cand
        s = _similarity_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim, stride_a, stride_c,
                             acc_ty, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        is_pos = cols[None, :] == pos[:, None]
        s_pos += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        keep = col_mask[None, :]
        if DRO:
            keep = keep & (cols[None, :] != pos[:, None])
        u = tl.where(keep, s * inv_tau[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=1))
        alpha = tl.exp(m - m_new)
        shifted = tl.where(keep, u - m_new[:, None], 0.0)
        e = tl.where(keep, tl.exp(shifted), 0.0)
        # A = Σ e^{u−m}(u−m) under a change of shift m → m_new: α (A + (m − m_new) l).
        a_stat = alpha * (a_stat + (m - m_new) * l) + tl.sum(e * shifted, axis=1)
        l = alpha * l + tl.sum(e, axis=1)
        m = m_new
    log_l = tl.log(l)
    lse = m + log_l
    mean_shifted = a_stat / l  # Σ_j p_ij u_ij − m
    if DRO:  # without the constant ρ − log(B−1), added by the caller in the accumulation dtype
        loss = tau * lse - s_pos
        dtau = log_l - mean_shifted
    else:
        loss = lse - s_pos * inv_tau
        dtau = -((m - s_pos * inv_tau) + mean_shifted) * inv_tau
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(dtau_ptr + rows, dtau, mask=row_mask)


@triton.jit
def _grad_anchors_kernel(a_ptr, c_ptr, inv_tau_ptr, lse_ptr, coef_ptr, da_ptr, n_anchor, n_cand, dim, offset,
                         stride_a, stride_c, stride_da,
                         DRO: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_D_OUT: tl.constexpr):
    """``∂/∂anchors[rows, feat_out] = Σ_j G_ij candidates[j, feat_out]``, streaming candidates."""
    acc_ty = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_anchor
    feat_out = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    feat_out_mask = feat_out < dim
    inv_tau = tl.load(inv_tau_ptr + rows, mask=row_mask, other=1.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D_OUT), dtype=acc_ty)
    for n0 in range(0, n_cand, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cand
        s = _similarity_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim, stride_a, stride_c,
                             acc_ty, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        g = _grad_tile(s, inv_tau, lse, coef, rows, cols, col_mask, offset, DRO)
        c = tl.load(c_ptr + cols[:, None] * stride_c + feat_out[None, :],
                    mask=col_mask[:, None] & feat_out_mask[None, :], other=0.0)
        if UPCAST:
            c = c.to(acc_ty)
        else:
            g = g.to(c.dtype)
        acc = tl.dot(g, c, acc, input_precision="ieee", out_dtype=acc_ty)
    tl.store(da_ptr + rows[:, None] * stride_da + feat_out[None, :], acc,
             mask=row_mask[:, None] & feat_out_mask[None, :])


@triton.jit
def _grad_candidates_kernel(a_ptr, c_ptr, inv_tau_ptr, lse_ptr, coef_ptr, dc_ptr, n_anchor, n_cand, dim, offset,
                            stride_a, stride_c, stride_dc,
                            DRO: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_D_OUT: tl.constexpr):
    """``∂/∂candidates[cols, feat_out] = Σ_i G_ij anchors[i, feat_out]``, streaming anchors."""
    acc_ty = lse_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cand
    feat_out = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    feat_out_mask = feat_out < dim
    acc = tl.zeros((BLOCK_N, BLOCK_D_OUT), dtype=acc_ty)
    for m0 in range(0, n_anchor, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_anchor
        inv_tau = tl.load(inv_tau_ptr + rows, mask=row_mask, other=1.0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        s = _similarity_tile(a_ptr, c_ptr, rows, cols, row_mask, col_mask, dim, stride_a, stride_c,
                             acc_ty, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        g = _grad_tile(s, inv_tau, lse, coef, rows, cols, col_mask, offset, DRO)
        a = tl.load(a_ptr + rows[:, None] * stride_a + feat_out[None, :],
                    mask=row_mask[:, None] & feat_out_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(acc_ty)
        else:
            g = g.to(a.dtype)
        acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee", out_dtype=acc_ty)
    tl.store(dc_ptr + cols[:, None] * stride_dc + feat_out[None, :], acc,
             mask=col_mask[:, None] & feat_out_mask[None, :])


def _upcast(features: torch.Tensor) -> bool:
    """Whether half-precision tiles are cast to the accumulation dtype before ``tl.dot``.

    Needed under the interpreter (Triton 3.8 returns garbage for bf16 ``tl.dot`` there); real GPUs
    keep bf16 / fp16 tensor-core dots.
    """
    return features.dtype in (torch.float16, torch.bfloat16) and (
        triton_interpreter_enabled() or features.device.type == "cpu"
    )


def _row_major(features: torch.Tensor) -> torch.Tensor:
    return features if features.stride(-1) == 1 else features.contiguous()


class _ContrastiveSide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, offset: int,
                rho: float | None, tiles: Tiles) -> torch.Tensor:
        anchors, candidates = _row_major(anchors), _row_major(candidates)
        n_anchor, dim = anchors.shape
        n_cand = candidates.shape[0]
        acc_dtype = compute_dtype(anchors.dtype)
        loss = torch.empty(n_anchor, dtype=acc_dtype, device=anchors.device)
        lse = torch.empty_like(loss)
        dtau = torch.empty_like(loss)
        dro = rho is not None
        _forward_kernel[(triton.cdiv(n_anchor, tiles.block_m),)](
            anchors, candidates, tau, loss, lse, dtau, n_anchor, n_cand, dim, offset,
            anchors.stride(0), candidates.stride(0), tau.stride(0),
            DRO=dro, UPCAST=_upcast(anchors), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
            num_warps=tiles.num_warps,
        )
        if dro:
            # Python floats reach kernels as float32: the DRO constant is added here instead.
            shift = rho - math.log(n_cand - 1)
            loss += shift * tau.to(acc_dtype)
            dtau += shift
        ctx.save_for_backward(anchors, candidates, tau, lse, dtau)
        ctx.offset, ctx.dro, ctx.tiles = offset, dro, tiles
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        anchors, candidates, tau, lse, dtau = ctx.saved_tensors
        tiles: Tiles = ctx.tiles
        n_anchor, dim = anchors.shape
        n_cand = candidates.shape[0]
        g = grad_loss.to(lse.dtype).contiguous()
        tau_acc = tau.to(lse.dtype)
        grad_anchors = grad_candidates = grad_tau = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            inv_tau = (1.0 / tau_acc).contiguous()
            coef = g if ctx.dro else g * inv_tau
            common = dict(DRO=ctx.dro, UPCAST=_upcast(anchors), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                          BLOCK_D=tiles.block_d, BLOCK_D_OUT=tiles.block_d_out, num_warps=tiles.num_warps)
            d_blocks = triton.cdiv(dim, tiles.block_d_out)
            if ctx.needs_input_grad[0]:
                grad_anchors = torch.empty_like(anchors)
                _grad_anchors_kernel[(triton.cdiv(n_anchor, tiles.block_m), d_blocks)](
                    anchors, candidates, inv_tau, lse, coef, grad_anchors, n_anchor, n_cand, dim, ctx.offset,
                    anchors.stride(0), candidates.stride(0), grad_anchors.stride(0), **common,
                )
            if ctx.needs_input_grad[1]:
                grad_candidates = torch.empty_like(candidates)
                _grad_candidates_kernel[(triton.cdiv(n_cand, tiles.block_n), d_blocks)](
                    anchors, candidates, inv_tau, lse, coef, grad_candidates, n_anchor, n_cand, dim, ctx.offset,
                    anchors.stride(0), candidates.stride(0), grad_candidates.stride(0), **common,
                )
        if ctx.needs_input_grad[2]:
            grad_tau = (g * dtau).to(tau.dtype)
        return grad_anchors, grad_candidates, grad_tau, None, None, None


def contrastive_side(anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, *, offset: int,
                     rho: float | None, tiles: Tiles | None = None) -> torch.Tensor:
    """Per-anchor contrastive losses of SPEC §2 (backend protocol, :mod:`tempnet.backends`).

    Args:
        anchors: ``(b, D)`` float16 / bfloat16 / float32 / float64, unit feature stride preferred.
        candidates: ``(B, D)``, same dtype and device; anchor ``i``'s positive is row ``offset + i``.
        tau: ``(b,)`` floating, > 0; may be a stride-0 view of a scalar.
        offset: index of anchor 0's positive among the candidates, ``0 <= offset <= B − b``.
        rho: ``None`` for InfoNCE (positive in the denominator), else the DRO ρ (needs ``B >= 2``).
        tiles: tile sizes (default :func:`default_tiles`).

    Returns:
        ``(b,)`` losses in float32 (float64 for float64 features), differentiable w.r.t.
        ``anchors``, ``candidates`` and ``tau``; the ``(b, B)`` similarities are never stored.
    """
    n_anchor, n_cand = anchors.shape[0], candidates.shape[0]
    if not 0 <= offset <= n_cand - n_anchor:
        raise ValueError(f"offset={offset} puts the positives of {n_anchor} anchors outside {n_cand} candidates")
    if tiles is None:
        tiles = default_tiles(anchors.shape[1], anchors.dtype, anchors.device)
    return _ContrastiveSide.apply(anchors, candidates, tau, offset, rho, tiles)
