"""The C++ backend's ``contrastive_side`` (csrc/contrastive.cpp) against the reference (SPEC §2, §4)."""

from __future__ import annotations

import math

import pytest
import torch

import tempnet
from tempnet import reference
from tempnet.backends.cpp_contrastive import contrastive_side

RHOS = [None, 0.7]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (SPEC §4)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    """``(n, dim)`` float64 unit rows, as CLIP embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)


def temperatures(n: int, seed: int) -> torch.Tensor:
    """``(n,)`` float64 temperatures in ``[0.05, 0.5)``."""
    gen = torch.Generator().manual_seed(seed)
    return 0.05 + 0.45 * torch.rand(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("scalar_tau", [False, True])
@pytest.mark.parametrize(("n_anchor", "n_cand", "offset", "blocks"), [
    (5, 5, 0, (2, 3)),      # square, several partial tiles
    (3, 8, 4, (2, 3)),      # rectangular b < B, positives at offset 4
    (4, 4, 0, (128, 256)),  # the default tiles
])
def test_gradcheck_contrastive_side(rho, scalar_tau, n_anchor, n_cand, offset, blocks):
    anchors = features(n_anchor, 6, 0).requires_grad_()
    candidates = features(n_cand, 6, 1).requires_grad_()
    if scalar_tau:
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    else:
        tau = temperatures(n_anchor, 2).requires_grad_()

    def side(a, c, t):
        t_rows = t.expand(n_anchor) if scalar_tau else t  # a stride-0 view, as the validation makes it
        return contrastive_side(a, c, t_rows, offset=offset, rho=rho, block_anchors=blocks[0],
                                block_candidates=blocks[1])

    assert torch.autograd.gradcheck(side, (anchors, candidates, tau))


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_public_loss(rho, reduction):
    image = features(5, 4, 3).requires_grad_()
    text = features(5, 4, 4).requires_grad_()
    tau_image = temperatures(5, 5).requires_grad_()
    tau_text = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def loss(x, t, ti, tt):
        return tempnet.tempered_contrastive_loss(x, t, ti, tt, rho=rho, reduction=reduction, backend="cpp")

    assert torch.autograd.gradcheck(loss, (image, text, tau_image, tau_text))


def check_parity(dtype, n_anchor, n_cand, offset, rho, loss_tol, grad_tol, blocks=(128, 256), tau_scale=1.0,
                 aligned=0):
    """Loss and gradients (with a random incoming gradient) against the float64 reference run on
    the same (rounded) inputs. The first ``aligned`` anchors equal their positives."""
    dim = 16
    anchors, candidates = features(n_anchor, dim, 10), features(n_cand, dim, 11)
    candidates[offset:offset + aligned] = anchors[:aligned]
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [anchors.to(dtype), candidates.to(dtype), (tau_scale * temperatures(n_anchor, 12)).to(tau_dtype)]
    inputs = [x.requires_grad_() for x in inputs]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    grad_out = torch.randn(n_anchor, generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    out = contrastive_side(*inputs, offset=offset, rho=rho, block_anchors=blocks[0], block_candidates=blocks[1])
    ref = reference.contrastive_side(*ref_inputs, offset=offset, rho=rho)
    (out * grad_out.to(out.dtype)).sum().backward()
    (ref * grad_out).sum().backward()

    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out, ref) < loss_tol
    for x, x_ref in zip(inputs, ref_inputs, strict=True):
        assert x.grad.dtype == x.dtype
        assert torch.isfinite(x.grad).all()
        assert rel_err(x.grad, x_ref.grad) < grad_tol


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("n_cand", [2, 3, 37, 300])
@pytest.mark.parametrize(("dtype", "loss_tol", "grad_tol"), [
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 2e-2, 2e-2),
])
def test_parity_with_reference(dtype, loss_tol, grad_tol, n_cand, rho):
    check_parity(dtype, n_cand, n_cand, 0, rho, loss_tol, grad_tol)


@pytest.mark.parametrize("rho", RHOS)
def test_parity_many_partial_tiles(rho):
    check_parity(torch.float32, 37, 37, 0, rho, 1e-5, 1e-4, blocks=(8, 16))
    check_parity(torch.float32, 21, 50, 13, rho, 1e-5, 1e-4, blocks=(8, 16))
    check_parity(torch.float64, 21, 50, 29, rho, 1e-10, 1e-9, blocks=(8, 16))


@pytest.mark.parametrize("rho", RHOS)
def test_cold_temperatures_stay_finite(rho):
    """τ ∈ [0.005, 0.05) with aligned pairs puts positives hundreds of nats above the negatives."""
    check_parity(torch.float32, 64, 64, 0, rho, 1e-5, 1e-4, blocks=(16, 32), tau_scale=0.1, aligned=16)


def clustered_pairs(n: int, dim: int, spread: float, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, dim)`` float64 unit anchors around one direction (pairwise similarities ≈ 1 − spread²·dim)
    and their positives, each its anchor plus ``noise``: near-aligned pairs a few hundredths above
    every negative."""
    gen = torch.Generator().manual_seed(seed)
    center = torch.zeros(dim, dtype=torch.float64)
    center[0] = 1.0
    anchors = torch.nn.functional.normalize(center + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64),
                                            dim=1)
    positives = anchors + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return anchors, torch.nn.functional.normalize(positives, dim=1)


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row ``‖out_i − ref_i‖ / ‖ref_i‖`` (per entry for vectors) in float64."""
    out, ref = out.double(), ref.double()
    if out.dim() == 1:
        return (out - ref).abs() / ref.abs()
    return (out - ref).norm(dim=1) / ref.norm(dim=1)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float32, 1e-3)])
@pytest.mark.parametrize(("tau0", "spread", "noise"), [(0.004, 0.08, 0.01), (0.002, 0.06, 0.02)])
def test_confident_rows_at_cold_temperature_are_accurate_per_row(rho, dtype, tol, tau0, spread, noise):
    """τ ≈ 0.004 with positives ≈ 15 nats above the negatives: 1 − p_pos ≈ 1e-4 … 1e-7, far below the
    float32 resolution of p_pos itself. Every row's loss and gradients (anchor row, candidate row, τ)
    match the float64 reference run on the same rounded inputs; p_pos − 1 formed from a rounded
    p_pos, or from u recomputed with a different rounding than the forward pass (an FMA), gives
    errors of 100% and more in those rows."""
    n = 48
    anchors, candidates = clustered_pairs(n, 16, spread, noise, seed=50)
    gen = torch.Generator().manual_seed(51)
    tau = tau0 * (1 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64))
    inputs = [x.requires_grad_() for x in (anchors.to(dtype), candidates.to(dtype), tau.float())]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)

    out = contrastive_side(*inputs, offset=0, rho=rho, block_anchors=16, block_candidates=32)
    ref = reference.contrastive_side(*ref_inputs, offset=0, rho=rho)
    (out * grad_out.float()).sum().backward()
    (ref * grad_out).sum().backward()

    if rho is None:
        assert ref.detach().min() < 1e-6  # some rows are that confident
    assert row_errors(out.detach(), ref.detach()).max() < tol
    for x, x_ref in zip(inputs, ref_inputs, strict=True):
        assert row_errors(x.grad, x_ref.grad).max() < tol


def test_hot_temperature_tau_gradient():
    """τ = 100: ∂L/∂τ = −Σ_j p_j (u_j − u_pos)/τ is tiny (u ≈ 1e-2); formed as a difference of two
    O(log B) terms it would be off by ~1e-3 relative in float32, here within 1e-5 per row."""
    n = 64
    anchors, candidates = features(n, 16, 52), features(n, 16, 53)
    for rho in RHOS:
        inputs = [anchors.float(), candidates.float(), torch.full((n,), 100.0, requires_grad=True)]
        ref_tau = torch.full((n,), 100.0, dtype=torch.float64, requires_grad=True)
        contrastive_side(*inputs, offset=0, rho=rho).sum().backward()
        reference.contrastive_side(anchors, candidates, ref_tau, offset=0, rho=rho).sum().backward()
        assert row_errors(inputs[2].grad, ref_tau.grad).max() < 1e-5


def test_dro_tau_gradient_closed_form():
    """SPEC §2: ∂LI_i/∂τI_i = H(w_i) − log(B−1) + ρ with w_i = softmax_{j≠i}((s_ij − s_ii)/τI_i)."""
    n, rho = 40, 0.7
    anchors, candidates = features(n, 8, 20), features(n, 8, 21)
    tau = temperatures(n, 22).requires_grad_()
    loss = contrastive_side(anchors, candidates, tau, offset=0, rho=rho, block_anchors=16, block_candidates=16)
    loss.sum().backward()

    sim = anchors @ candidates.T
    shifted = ((sim - sim.diagonal()[:, None]) / tau.detach()[:, None]).fill_diagonal_(float("-inf"))
    log_w = torch.log_softmax(shifted, dim=1)
    entropy = -(log_w.exp() * log_w.nan_to_num(neginf=0.0)).sum(1)
    torch.testing.assert_close(tau.grad, entropy - math.log(n - 1) + rho, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("wanted", [0, 1, 2])
def test_only_requested_gradients(wanted, rho):
    """A single input requiring grad gets the reference gradient (the others' sweeps are skipped)."""
    inputs = [features(6, 4, 30), features(9, 4, 31), temperatures(6, 32)]
    inputs[wanted].requires_grad_()
    ref_inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
    contrastive_side(*inputs, offset=2, rho=rho, block_anchors=4, block_candidates=4).sum().backward()
    reference.contrastive_side(*ref_inputs, offset=2, rho=rho).sum().backward()
    torch.testing.assert_close(inputs[wanted].grad, ref_inputs[wanted].grad, rtol=1e-10, atol=1e-12)


def test_nan_anchor_stays_in_its_row():
    anchors, candidates, tau = features(7, 4, 40), features(7, 4, 41), temperatures(7, 42)
    anchors[3, 1] = float("nan")
    for rho in RHOS:
        loss = contrastive_side(anchors, candidates, tau, offset=0, rho=rho, block_anchors=2, block_candidates=3)
        assert torch.isnan(loss[3])
        assert torch.isfinite(torch.cat([loss[:3], loss[4:]])).all()
