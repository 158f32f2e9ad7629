"""Fused Triton kernels for one side of the contrastive loss of SPEC §2.

:func:`contrastive_side` scores ``b`` anchors against ``B`` candidates holding at most a
``CHUNK_BYTES`` chunk of rows of the ``(b, B)`` similarity matrix (all of it only when it is that small):

- forward (flash-style): every program owns a block of anchors and streams candidate tiles,
  computing ``s = anchors @ candidates.T`` tile by tile with ``tl.dot`` and keeping an online
  log-sum-exp per anchor; it stores three ``(b,)`` statistics (loss, ``lse``, ``∂L/∂τ``);
- backward (row-chunked, :mod:`tempnet.kernels._chunked_gemm`): for chunks of anchors the
  similarities are recomputed into one reusable buffer of at most ``CHUNK_BYTES`` (256 MiB), a
  row kernel turns them into ``G`` below, and two GEMMs give ``∂/∂anchors = G @ candidates`` and
  ``∂/∂candidates += G.T @ anchors``. Recomputing a similarity tile per output block in Triton
  would redo the ``b·B·D`` product once per ``D``-block of the gradient (each program can hold
  only a slice of the ``D`` columns in registers); cuBLAS does each product once.

Memory is ``O((b + B)·D)`` plus the chunk buffer.

With ``u_ij = s_ij / τ_i`` and ``p_i`` the softmax of ``u_i`` over the candidate set (all
candidates for InfoNCE, the negatives ``j ≠ pos`` for the DRO loss), the per-anchor gradients are

- InfoNCE: ``∂L_i/∂s_ij = (p_ij − 1[j=pos]) / τ_i``, ``∂L_i/∂τ_i = −(Σ_j p_ij u_ij − u_i,pos) / τ_i``;
- DRO:     ``∂L_i/∂s_ij = p_ij − 1[j=pos]``,         ``∂L_i/∂τ_i = H(p_i) − log(B−1) + ρ``,

so backward only needs ``G_ij = c_i (p_ij − 1[j=pos])`` with ``c_i = g_i/τ_i`` or ``g_i`` (``g`` the
incoming per-anchor gradient). ``Σ_j p_ij u_ij`` is accumulated online as
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
from tempnet.kernels._chunked_gemm import HALF, gradient_dtype, gradient_products, rows_per_chunk, scores_into

# Floor of the running maximum: finite, so a tile whose entries are all masked (e.g. only the
# positive) gives exp(-inf - floor) = 0 instead of exp(-inf + inf) = NaN.
_MAX_FLOOR = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the forward kernel: ``block_m`` anchors × ``block_n`` candidates per similarity
    tile, reduced over ``block_d`` features at a time. On a GPU every size must be a power of two ≥ 16."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4


def default_tiles(dim: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """Tile sizes for features of width ``dim``: whole feature rows in one chunk up to 128 wide."""
    block_d = min(max(triton.next_power_of_2(dim), 16), 128)
    if device.type != "cuda":
        return Tiles(32, 32, block_d)
    if dtype == torch.float64:
        return Tiles(32, 32, min(block_d, 64))
    if dtype in (torch.float16, torch.bfloat16):
        # Best of benchmarks/gpu_tune.py on an H200 (B = 16384, D = 768, bfloat16, one side forward +
        # backward): 478 TFLOP/s against 435 for 64 × 64 tiles (benchmarks/results/gpu_tune-h200-2026-11-26.json).
        return Tiles(128, 128, min(block_d, 64), num_warps=8)
    return Tiles(64, 64, min(block_d, 64), num_warps=8 if block_d >= 128 else 4)


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
def _similarity_grad_kernel(s_ptr, stride_s, g_ptr, stride_g, inv_tau_ptr, lse_ptr, coef_ptr, n_cand, first_row,
                            offset, DRO: tl.constexpr, BLOCK: tl.constexpr):
    """``G[r, j] = c_i (p_ij − 1[j = pos_i])`` for anchor ``i = first_row + r`` of a chunk of similarities.

    ``p_ij = exp(s_ij/τ_i − lse_i)`` (0 at the positive in DRO mode); one program per
    ``(row, BLOCK columns)``; ``G`` may overwrite ``s`` or go to a buffer of another dtype.
    """
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cand
    i = first_row + r
    inv_tau = tl.load(inv_tau_ptr + i)
    lse = tl.load(lse_ptr + i)
    coef = tl.load(coef_ptr + i)
    is_pos = cols == i + offset
    s = tl.load(s_ptr + r * stride_s + cols, mask=mask, other=0.0)
    p = tl.exp(s * inv_tau - lse)
    if DRO:
        p = tl.where(is_pos, 0.0, p)
    g = coef * (p - tl.where(is_pos, 1.0, 0.0))
    tl.store(g_ptr + r * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


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
                rho: float | None, tiles: Tiles, chunk_rows: int | None) -> torch.Tensor:
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
        ctx.offset, ctx.dro, ctx.chunk_rows = offset, dro, chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        anchors, candidates, tau, lse, dtau = ctx.saved_tensors
        need_anchors, need_candidates, need_tau = ctx.needs_input_grad[:3]
        n_anchor, n_cand = anchors.shape[0], candidates.shape[0]
        acc = lse.dtype
        g = grad_loss.to(acc)
        grad_anchors = grad_candidates = grad_tau = None
        if need_anchors or need_candidates:
            inv_tau = (1.0 / tau.to(acc)).contiguous()
            coef = (g if ctx.dro else g * inv_tau).contiguous()
            chunk = ctx.chunk_rows or rows_per_chunk(n_anchor, n_cand, torch.finfo(acc).bits // 8)
            scores = torch.empty(min(chunk, n_anchor), n_cand, dtype=acc, device=anchors.device)
            grad_dtype = gradient_dtype(anchors, acc)
            grads = scores if grad_dtype == acc else torch.empty(scores.shape, dtype=grad_dtype, device=anchors.device)
            if need_anchors:
                grad_anchors = torch.empty_like(anchors)
            if need_candidates:
                table_dtype = acc if candidates.dtype in HALF else candidates.dtype
                grad_candidates = torch.zeros(candidates.shape, dtype=table_dtype, device=candidates.device)
            block = min(triton.next_power_of_2(n_cand), 1024)
            for start in range(0, n_anchor, chunk):
                end = min(start + chunk, n_anchor)
                sims = scores_into(scores[:end - start], anchors[start:end], candidates)
                grad_sims = grads[:end - start]
                _similarity_grad_kernel[(end - start, triton.cdiv(n_cand, block))](
                    sims, sims.stride(0), grad_sims, grad_sims.stride(0), inv_tau, lse, coef, n_cand, start,
                    ctx.offset, DRO=ctx.dro, BLOCK=block,
                )
                gradient_products(grad_sims, anchors[start:end], candidates,
                                  grad_anchors[start:end] if need_anchors else None, grad_candidates)
            if grad_candidates is not None:
                grad_candidates = grad_candidates.to(candidates.dtype)
        if need_tau:
            grad_tau = (g * dtau).to(tau.dtype)
        return grad_anchors, grad_candidates, grad_tau, None, None, None, None


def contrastive_side(anchors: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, *, offset: int,
                     rho: float | None, tiles: Tiles | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-anchor contrastive losses of SPEC §2 (backend protocol, :mod:`tempnet.backends`).

    Args:
        anchors: ``(b, D)`` float16 / bfloat16 / float32 / float64, unit feature stride preferred.
        candidates: ``(B, D)``, same dtype and device; anchor ``i``'s positive is row ``offset + i``.
        tau: ``(b,)`` floating, > 0; may be a stride-0 view of a scalar.
        offset: index of anchor 0's positive among the candidates, ``0 <= offset <= B − b``.
        rho: ``None`` for InfoNCE (positive in the denominator), else the DRO ρ (needs ``B >= 2``).
        tiles: tile sizes of the forward kernel (default :func:`default_tiles`).
        chunk_rows: anchors per chunk of the backward pass (default: the chunk rule of
            :mod:`tempnet.kernels._chunked_gemm`, at most ``CHUNK_BYTES`` of similarities).

    Returns:
        ``(b,)`` losses in float32 (float64 for float64 features), differentiable w.r.t.
        ``anchors``, ``candidates`` and ``tau``; the ``(b, B)`` similarities are never stored
        (backward recomputes them, at most ``CHUNK_BYTES`` at a time).
    """
    n_anchor, n_cand = anchors.shape[0], candidates.shape[0]
    if not 0 <= offset <= n_cand - n_anchor:
        raise ValueError(f"offset={offset} puts the positives of {n_anchor} anchors outside {n_cand} candidates")
    if tiles is None:
        tiles = default_tiles(anchors.shape[1], anchors.dtype, anchors.device)
    return _ContrastiveSide.apply(anchors, candidates, tau, offset, rho, tiles, chunk_rows)
