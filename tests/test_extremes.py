"""Extreme and degenerate inputs on every backend (SPEC §1, §2, §4, §5).

Huge logits (±1e4 in float32 / float64, ±65000 in float16), temperatures down to 1e-4, rows of
equal logits, ``V = 1`` and ``V = 2``, contrastive batches of 1 and 2, batches where every row is
ignored, non-finite logits and features, row offsets beyond 2^31 elements, the float32 accuracy
limits of small temperatures and confident rows, and the SPEC §5 bad inputs that
tests/test_validation.py does not cover. Shapes stay tiny: Triton runs through its interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
from hardening_utils import (
    BACKENDS,
    TOLERANCES,
    assert_matches_reference,
    check_against_reference,
    incoming_gradient,
    rel_err,
    run_contrastive,
    run_cross_entropy,
    run_linear_cross_entropy,
)

import tempnet

RHOS = [None, 0.5]
EPS32 = torch.finfo(torch.float32).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _integer_logits(n: int, vocab: int, peak: float, seed: int) -> torch.Tensor:
    """``(n, vocab)`` integer-valued float64 logits in ``[−peak, peak]``, exact in float32 (and in
    float16 for ``peak ≤ 2048`` or even multiples of 32 above), with ties and near-ties at the top."""
    gen = _gen(seed)
    logits = torch.randint(-int(peak), int(peak) + 1, (n, vocab), generator=gen).double()
    logits[:, 0] = peak
    logits[:, 1] = -peak
    logits[:, 2] = peak - 1
    return logits


# ----------------------------------------------------------------------------------------------
# Extreme values: finite and equal to the float64 reference within SPEC §4.
# ----------------------------------------------------------------------------------------------


def check_within_float32_bound(run, backend: str, dtype: torch.dtype, max_u: float, *args, **kwargs) -> None:
    """Finite, and within ``max(SPEC §4 tolerance, 8·ε₃₂·max|u|)`` of the float64 reference.

    Every backend (the float32 PyTorch reference included) rounds ``u = z/τ`` and ``lse ≈ max u``
    to float32 and forms ``p = exp(u − lse)``, so outputs carry a relative error up to about
    ``ε₃₂·max|u|``; beyond ``max|u| ≈ 10³`` that exceeds the float32 tolerances (the report
    proposes computing ``exp(u − m) / s`` and ``(m − u_y) + log s`` instead, which would not).
    """
    reference = run("torch", *args, as_float64=True, **kwargs)
    out = run(backend, *args, **kwargs)
    for name, ref in reference.items():
        assert torch.isfinite(out[name]).all(), name
        bound = max(TOLERANCES[dtype][1 if name.startswith("grad") else 0], 8 * EPS32 * max_u)
        assert rel_err(out[name], ref) <= bound, f"{name}: {rel_err(out[name], ref):.3e} > {bound:.3e}"


def shifted_reference(logits: torch.Tensor, target: torch.Tensor, tau: torch.Tensor,
                      **kwargs) -> dict[str, torch.Tensor]:
    """The float64 reference run on row-shifted logits ``z − max z`` (no softcap, no z-loss).

    Every output but ``lse`` is shift-invariant (``lse`` shifts by ``max z / τ``, added back).
    On the raw logits at ``|z|/τ ≈ 2e4`` the reference's autograd τ-gradient is off by ~1e-8
    (test_reference_dro_tau_gradient_at_large_logit_over_tau), which would blame the backends.
    """
    shift = logits.detach().double().max(dim=1, keepdim=True).values
    shifted = (logits.detach().double() - shift).requires_grad_(logits.requires_grad)
    reference = run_cross_entropy("torch", shifted, target, tau, as_float64=True, **kwargs)
    if "lse" in reference:
        reference["lse"] = reference["lse"] + shift.squeeze(1) / tau.detach().double()
    return reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rho", RHOS)
def test_logits_of_plus_minus_1e4(backend, dtype, rho):
    """|z| = 1e4 with τ a power of two (so u = z/τ is exact): no overflow, no NaN; float64 within
    SPEC §4, float32 within the documented float32 bound (|u| up to 2e4).

    The float64 reference runs on row-shifted logits (:func:`shifted_reference`).
    """
    logits = _integer_logits(4, 9, 1e4, seed=1).to(dtype).requires_grad_()
    target = torch.tensor([0, 1, 2, 5])  # the maximum, the minimum, the near-tie, a random class
    tau = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=dtype, requires_grad=True)
    kwargs = {"rho": rho, "reduction": "none", "return_lse": True}
    if dtype == torch.float32:
        check_within_float32_bound(run_cross_entropy, backend, dtype, 2e4, logits, target, tau, **kwargs)
        return
    reference = shifted_reference(logits, target, tau, **kwargs)
    assert_matches_reference(run_cross_entropy(backend, logits, target, tau, **kwargs), reference, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_dro_tau_gradient_at_large_logit_over_tau(backend):
    """float64 DRO ∂L/∂τ = H(p) − log V + ρ at |z|/τ = 2e4 must hold to SPEC §4 (1e-9).

    Autograd of ``τ·lse(z/τ)`` forms it as ``lse(u) − Σ p u``, a difference of two ~2e4 terms, and
    loses ~1e-8; the fused backends use the shifted closed form and are exact.
    """
    logits = _integer_logits(4, 9, 1e4, seed=1)
    target = torch.tensor([0, 1, 2, 5])
    tau = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    rho = 0.5
    log_p = torch.log_softmax((logits - logits.max(dim=1, keepdim=True).values) / tau.detach()[:, None], dim=1)
    expected = -(log_p.exp() * log_p).sum(1) - math.log(9) + rho
    loss = tempnet.tempered_cross_entropy(logits, target, tau, rho=rho, reduction="sum", backend=backend)
    (grad_tau,) = torch.autograd.grad(loss, [tau])
    assert rel_err(grad_tau, expected) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", RHOS)
def test_float16_logits_near_65000(backend, rho):
    """float16 logits at ±64992 (the largest multiple of 32 that float16 holds below 65504)."""
    logits = (32 * torch.round(_integer_logits(3, 10, 64992, seed=2) / 32)).half().requires_grad_()
    assert torch.isfinite(logits).all()
    target = torch.tensor([0, 1, 7])
    tau = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    out = check_against_reference(run_cross_entropy, backend, torch.float16, logits, target, tau, rho=rho,
                                  reduction="none", context=backend)
    assert out["grad_logits"].dtype == torch.float16 and out["loss"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_contrastive_similarities_near_65000(backend):
    """float16 features whose products reach ±62500: similarities are accumulated in float32."""
    image = torch.tensor([[250.0], [-250.0], [125.0]], dtype=torch.float16, requires_grad=True)
    text = torch.tensor([[250.0], [250.0], [-60.0]], dtype=torch.float16, requires_grad=True)
    tau = torch.tensor([1024.0, 2048.0, 512.0], requires_grad=True)
    for rho in RHOS:
        check_against_reference(run_contrastive, backend, torch.float16, image, text, tau, 4096.0, rho=rho,
                                reduction="none", context=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", RHOS)
def test_temperature_1e_4_in_float64(backend, rho):
    """τ = 1e-4 puts u = z/τ near 3e4: float64 keeps SPEC §4 accuracy for every backend."""
    logits = torch.randn(3, 11, generator=_gen(3), dtype=torch.float64).requires_grad_()
    target = torch.tensor([4, 0, 10])
    tau = torch.full((3,), 1e-4, dtype=torch.float64, requires_grad=True)
    check_against_reference(run_cross_entropy, backend, torch.float64, logits, target, tau, rho=rho,
                            reduction="none", label_smoothing=0.1, context=backend)
    hidden = torch.randn(3, 4, generator=_gen(4), dtype=torch.float64).requires_grad_()
    weight = torch.randn(6, 4, generator=_gen(5), dtype=torch.float64).requires_grad_()
    check_against_reference(run_linear_cross_entropy, backend, torch.float64, hidden, weight, target % 6, tau,
                            rho=rho, reduction="none", context=backend)
    image = torch.nn.functional.normalize(torch.randn(4, 5, generator=_gen(6), dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(4, 5, generator=_gen(7), dtype=torch.float64), dim=1)
    check_against_reference(run_contrastive, backend, torch.float64, image.requires_grad_(), text, 1e-4,
                            torch.full((4,), 1e-4, dtype=torch.float64, requires_grad=True), rho=rho,
                            context=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_1e_4_stays_finite_within_the_float32_bound(backend, dtype):
    """τ = 1e-4 with unit-scale logits in float32 / bfloat16: |u| ≈ 3e4, finite and within the
    documented float32 bound (~3e-2 here; see :func:`check_within_float32_bound`)."""
    logits = torch.randn(4, 13, generator=_gen(8)).to(dtype).requires_grad_()
    target = torch.tensor([0, 3, 12, 7])
    tau = torch.full((4,), 1e-4, requires_grad=True)
    check_within_float32_bound(run_cross_entropy, backend, dtype, logits.abs().max().item() / 1e-4, logits, target,
                               tau, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rho", RHOS)
def test_row_of_equal_logits(backend, dtype, rho):
    """Equal logits (at 1e4 and at −3.25): p uniform, plain loss log V, DRO loss ρτ.

    float32 rounds lse ≈ 2e4 + log V to a spacing of 2e-3, so the 1e4 row is checked against
    the float32 bound of :func:`check_within_float32_bound`.
    """
    vocab = 12
    logits = torch.randn(3, vocab, generator=_gen(9), dtype=torch.float64)
    logits[0] = 1e4
    logits[1] = -3.25
    logits = logits.to(dtype).requires_grad_()
    target = torch.tensor([4, 11, 2])
    tau = torch.tensor([0.5, 2.0, 1.0], dtype=dtype, requires_grad=True)
    kwargs = {"rho": rho, "reduction": "none"}
    if dtype == torch.float32:
        check_within_float32_bound(run_cross_entropy, backend, dtype, 2e4, logits, target, tau, **kwargs)
        return
    out = run_cross_entropy(backend, logits, target, tau, **kwargs)
    assert_matches_reference(out, shifted_reference(logits, target, tau, **kwargs), dtype, backend)
    expected = torch.full((2,), math.log(vocab), dtype=dtype) if rho is None else rho * tau.detach()[:2]
    torch.testing.assert_close(out["loss"][:2], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2])
@pytest.mark.parametrize("rho", [None, 0.0, 0.3])
def test_vocabularies_of_one_and_two_classes(backend, vocab, rho):
    """V = 1 (plain loss 0, logits gradient 0) and V = 2, with and without every §1b option."""
    if rho is not None and rho > math.log(vocab):
        rho = math.log(vocab)
    logits = (3 * torch.randn(4, vocab, generator=_gen(10), dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0, vocab - 1, -100, 0])
    tau = torch.tensor([0.3, 1.0, 2.0, 7.0], dtype=torch.float64, requires_grad=True)
    for options in ({}, {"softcap": 2.0, "label_smoothing": 0.2, "z_loss": 1e-3,
                         "weight": torch.linspace(0.5, 1.5, vocab, dtype=torch.float64)}):
        out = check_against_reference(run_cross_entropy, backend, torch.float64, logits, target, tau, rho=rho,
                                      reduction="none", return_lse=True, context=backend, **options)
        if vocab == 1 and rho is None and not options:
            assert (out["loss"] == 0).all() and (out["grad_logits"] == 0).all()
    hidden = torch.randn(4, 3, generator=_gen(11), dtype=torch.float64).requires_grad_()
    weight = torch.randn(vocab, 3, generator=_gen(12), dtype=torch.float64).requires_grad_()
    check_against_reference(run_linear_cross_entropy, backend, torch.float64, hidden, weight, target, tau, rho=rho,
                            bias=torch.ones(vocab, dtype=torch.float64, requires_grad=True), context=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch", "rho"), [(1, None), (2, None), (2, 0.0), (2, 1.5)])
def test_contrastive_batches_of_one_and_two(backend, batch, rho):
    """B = 2 is the smallest DRO batch (one negative, log(B−1) = 0); B = 1 InfoNCE has loss 0."""
    image = torch.randn(batch, 3, generator=_gen(13), dtype=torch.float64).requires_grad_()
    text = torch.randn(batch, 3, generator=_gen(14), dtype=torch.float64).requires_grad_()
    tau_image = torch.linspace(0.1, 0.9, batch, dtype=torch.float64).requires_grad_()
    tau_text = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    out = check_against_reference(run_contrastive, backend, torch.float64, image, text, tau_image, tau_text, rho=rho,
                                  reduction="none", context=backend)
    if batch == 1:
        assert (out["loss_image"] == 0).all() and (out["loss_text"] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    """0 rows: loss 0 (never NaN), lse 0, zero gradients, for both cross-entropy ops (SPEC §1)."""
    target = torch.full((2, 3), 7)
    logits = torch.randn(2, 3, 5, generator=_gen(15)).requires_grad_()
    tau = torch.full((2, 3), 0.5, requires_grad=True)
    for rho in RHOS:
        out = run_cross_entropy(backend, logits, target, tau, rho=rho, ignore_index=7, reduction=reduction,
                                return_lse=True, label_smoothing=0.1, weight=torch.rand(5) + 0.5)
        hidden = torch.randn(2, 3, 4, generator=_gen(16)).requires_grad_()
        weight = torch.randn(5, 4, generator=_gen(17)).requires_grad_()
        out_linear = run_linear_cross_entropy(backend, hidden, weight, target, tau, ignore_index=7, rho=rho,
                                              reduction=reduction, return_lse=True)
        for name, value in {**out, **{f"linear_{k}": v for k, v in out_linear.items()}}.items():
            assert (value == 0).all(), f"{name} = {value}"


# ----------------------------------------------------------------------------------------------
# Float32 accuracy limits, pinned as bounds (see tests/test_properties.py for the drawn ranges).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_rows_in_float32_are_accurate_to_epsilon_times_lse(backend):
    """A loss far below 1 next to |u| ≈ 12 (aligned CLIP pairs at τ = 0.08).

    Every backend forms ``lse`` (≈ max u) in float32 and subtracts ``u_pos``, so the loss is exact
    only to ~ε₃₂·|lse| in absolute terms: here a relative error above the 1e-5 float32 tolerance.
    Computing ``(m − u_pos) + log Σ exp(u − m)`` instead would make it relative (see the report).
    """
    gen = _gen(18)
    image = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + 0.05 * torch.randn(12, 16, generator=gen), dim=1)
    tau = 0.08
    reference = run_contrastive("torch", image, text, tau, tau, as_float64=True, reduction="none")
    out = run_contrastive(backend, image, text, tau, tau, reduction="none")
    for name in ("loss_image", "loss_text"):
        assert reference[name].max() < 0.05  # confident rows
        error = (out[name].double() - reference[name]).abs().max().item()
        assert error <= 16 * EPS32 * (1 / tau), f"{name}: {error:.3e}"


# ----------------------------------------------------------------------------------------------
# Known backend deviations (failing until fixed; see the hardening report).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bfloat16_keeps_logits_in_float32(backend):
    """bfloat16 hidden/weight at τ = 0.05: logits must not be rounded to bfloat16 before /τ.

    The logits ``8 + w_k`` are exact in float32 but bfloat16 spaces values near 8 by 1/16, so a
    bfloat16 logits buffer moves ``u`` by up to 0.6 and the softmax by up to 80%.
    """
    vocab = 16
    weight = torch.zeros(vocab, 2, dtype=torch.float64)
    weight[:, 0] = 8.0
    weight[:, 1] = torch.linspace(0.0, 0.3, vocab, dtype=torch.float64)
    weight = weight.bfloat16().requires_grad_()
    hidden = torch.ones(3, 2, dtype=torch.bfloat16, requires_grad=True)
    target = torch.tensor([0, 7, 15])
    tau = torch.full((3,), 0.05, requires_grad=True)
    check_against_reference(run_linear_cross_entropy, backend, torch.bfloat16, hidden, weight, target, tau,
                            reduction="none", context=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_tau_gradient_at_hot_temperature(backend):
    """Plain InfoNCE τ-gradient at τ = 100 in float32 (a TempNet head may emit large τ early on).

    ``∂L/∂τ = −(Σ p u − u_pos)/τ`` is tiny there (u ≈ 1e-2); it must not be formed as the
    difference of two O(log B) quantities ``H(p) − (lse − u_pos)``.
    """
    gen = _gen(19)
    image = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1).requires_grad_()
    tau = torch.full((64,), 100.0, requires_grad=True)
    check_against_reference(run_contrastive, backend, torch.float32, image, text, tau, tau, reduction="none",
                            context=backend)


# ----------------------------------------------------------------------------------------------
# Non-finite inputs stay in their row (SPEC §5).
# ----------------------------------------------------------------------------------------------


def _non_finite_logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: 0 NaN, 1 +inf off target, 2 +inf at the target, 3 all −inf, 4-5 finite; target."""
    logits = torch.randn(6, 9, generator=_gen(20)).to(dtype)
    logits[0, 3] = float("nan")
    logits[1, 2] = float("inf")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    return logits, torch.tensor([0, 1, 5, 2, 8, 4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rho", RHOS)
def test_non_finite_logits_poison_only_their_row(backend, dtype, rho):
    """Affected rows give NaN (or the reference's ±inf); the other rows' losses and gradients (logits
    and per-row τ) are finite and equal to the reference; with every §1b option on."""
    logits, target = _non_finite_logits(dtype)
    tau = torch.linspace(0.5, 2.0, 6).requires_grad_()
    options = {"rho": rho, "softcap": None, "label_smoothing": 0.1, "z_loss": 1e-3, "weight": torch.rand(9) + 0.5,
               "reduction": "none", "return_lse": True}
    reference = run_cross_entropy("torch", logits.requires_grad_(), target, tau, as_float64=True, **options)
    out = run_cross_entropy(backend, logits, target, tau, **options)
    affected, clean = slice(0, 4), slice(4, 6)
    for value, ref in zip(out["loss"][affected], reference["loss"][affected], strict=True):
        assert torch.isnan(value) or value == ref
    assert torch.isfinite(out["grad_logits"][clean]).all() and torch.isfinite(out["grad_tau"][clean]).all()
    for name in ("loss", "lse", "grad_logits", "grad_tau"):
        tol = TOLERANCES[dtype][1 if name.startswith("grad") else 0]
        assert rel_err(out[name][clean], reference[name][clean]) <= tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_keeps_loss_and_logit_gradients_finite(backend):
    """−inf logits (masked classes) are legitimate: finite loss and ∂/∂z equal to the reference.

    ∂/∂τ of such a row contains ``p_k z_k = 0·(−inf)``: the Triton kernel returns its limit 0
    (finite); the reference and the C++ backend return NaN in that row only, which SPEC §5 allows.
    """
    logits = torch.randn(3, 10, generator=_gen(21), dtype=torch.float64)
    logits[:2, 6:] = float("-inf")
    target = torch.tensor([1, 4, 9])
    tau = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64, requires_grad=True)
    for rho in RHOS:
        reference = run_cross_entropy("torch", logits.requires_grad_(), target, tau, rho=rho, reduction="none")
        out = run_cross_entropy(backend, logits, target, tau, rho=rho, reduction="none")
        assert torch.isfinite(out["loss"]).all() and torch.isfinite(out["grad_logits"]).all()
        assert rel_err(out["loss"], reference["loss"]) <= 1e-10
        assert rel_err(out["grad_logits"], reference["grad_logits"]) <= 1e-9
        # The τ-gradient of a masked row equals that of the row without its masked classes
        # (ρ shifted so that ρ − log V is unchanged), or NaN.
        unmasked = run_cross_entropy("torch", logits[:2, :6], target[:2], tau[:2],
                                     rho=None if rho is None else rho - math.log(10) + math.log(6), reduction="none")
        masked_rows = out["grad_tau"][:2]
        assert torch.isnan(masked_rows).all() or rel_err(masked_rows, unmasked["grad_tau"]) <= 1e-9
        assert rel_err(out["grad_tau"][2:], reference["grad_tau"][2:]) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", RHOS)
def test_nan_feature_row_in_contrastive_loss(backend, rho):
    """A NaN image row i: its own image loss is NaN, every text loss is NaN (candidate i enters
    every text anchor's log-sum-exp), every other image loss stays finite and exact."""
    image = torch.randn(5, 4, generator=_gen(22))
    text = torch.randn(5, 4, generator=_gen(23))
    image[2, 1] = float("nan")
    reference = run_contrastive("torch", image, text, 0.3, 0.5, rho=rho, reduction="none", as_float64=True)
    out = run_contrastive(backend, image, text, 0.3, 0.5, rho=rho, reduction="none")
    assert torch.isnan(out["loss_image"][2]) and torch.isnan(out["loss_text"]).all()
    clean = [0, 1, 3, 4]
    assert rel_err(out["loss_image"][clean], reference["loss_image"][clean]) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Row offsets beyond 2^31 elements (int64 pointer arithmetic). The Triton cross-entropy kernel has
# its own test in tests/test_triton_cross_entropy.py.
# ----------------------------------------------------------------------------------------------


def _two_far_rows(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(2, width)`` bfloat16 view whose row 1 starts 2^31 elements (4 GiB) after row 0; the
    buffer comes from ``torch.empty`` so only the two rows' pages are ever touched."""
    stride = 2**31
    buffer = torch.empty(stride + width, dtype=torch.bfloat16)
    view = buffer.as_strided((2, width), (stride, 1))
    values = torch.randn(2, width, generator=_gen(seed)).bfloat16()
    view.copy_(values)
    return view, values


@pytest.mark.parametrize("inplace", [False, True])
def test_cpp_cross_entropy_row_offsets_beyond_2_31(inplace):
    logits, values = _two_far_rows(24, seed=24)
    target = torch.tensor([3, 20])
    tau = torch.tensor([0.9, 0.6], requires_grad=True)
    reference = run_cross_entropy("torch", values.requires_grad_(), target, tau, as_float64=True, reduction="none")
    z = logits.requires_grad_()
    loss = tempnet.tempered_cross_entropy(z, target, tau, reduction="none", backend="cpp", inplace_backward=inplace)
    grad_logits, _ = torch.autograd.grad(loss, [z, tau], incoming_gradient(loss, 0).float())
    assert rel_err(loss, reference["loss"]) <= 2e-2
    assert rel_err(grad_logits, reference["grad_logits"]) <= 2e-2
    if inplace:  # the gradient overwrote the far row in place
        assert torch.equal(z.detach(), grad_logits)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_linear_and_contrastive_row_offsets_beyond_2_31(backend):
    hidden, hidden_values = _two_far_rows(8, seed=25)
    weight = torch.randn(5, 8, generator=_gen(26)).bfloat16()
    target = torch.tensor([1, 4])
    reference = run_linear_cross_entropy("torch", hidden_values.requires_grad_(), weight, target, 0.7,
                                         reduction="none", as_float64=True)
    h = hidden.requires_grad_()
    loss = tempnet.tempered_linear_cross_entropy(h, weight, target, 0.7, reduction="none", backend=backend)
    (grad_hidden,) = torch.autograd.grad(loss, [h], incoming_gradient(loss, 1).float())
    assert rel_err(loss, reference["loss"]) <= 2e-2
    assert rel_err(grad_hidden, reference["grad_hidden"]) <= 2e-2
    del hidden, h, grad_hidden

    anchors, anchor_values = _two_far_rows(8, seed=27)
    candidates = torch.randn(2, 8, generator=_gen(28)).bfloat16()
    reference = run_contrastive("torch", anchor_values.requires_grad_(), candidates, 0.5, 0.5, rho=0.2,
                                reduction="none", as_float64=True)
    a = anchors.requires_grad_()
    loss_image, loss_text = tempnet.tempered_contrastive_loss(a, candidates, 0.5, 0.5, rho=0.2, reduction="none",
                                                              backend=backend)
    incoming = [incoming_gradient(loss_image, 2).float(), incoming_gradient(loss_text, 3).float()]
    (grad_image,) = torch.autograd.grad([loss_image, loss_text], [a], incoming)
    assert rel_err(loss_image, reference["loss_image"]) <= 2e-2
    assert rel_err(loss_text, reference["loss_text"]) <= 2e-2
    assert rel_err(grad_image, reference["grad_image"]) <= 2e-2


# ----------------------------------------------------------------------------------------------
# SPEC §5 bad inputs not covered by tests/test_validation.py: mixed devices for the linear and
# contrastive ops, dtype mismatches, non-integer ignore_index, integer class weights.
# ----------------------------------------------------------------------------------------------

META = torch.device("meta")


def _linear_args(**overrides):
    args = {"hidden": torch.randn(3, 4), "weight": torch.randn(6, 4), "target": torch.tensor([0, 5, 1]), "tau": 0.7}
    args.update(overrides)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "overrides"), [
    (ValueError, "weight", {"weight": torch.randn(6, 4, device=META)}),
    (ValueError, "bias", {"bias": torch.randn(6, device=META)}),
    (ValueError, "target", {"target": torch.tensor([0, 5, 1], device=META)}),
    (ValueError, "tau", {"tau": torch.ones(3, device=META)}),
    (ValueError, "class_weight", {"class_weight": torch.ones(6, device=META)}),
    (TypeError, "class_weight", {"class_weight": torch.ones(6, dtype=torch.int64)}),
    (TypeError, "ignore_index", {"ignore_index": 1.5}),
    (TypeError, "tau", {"tau": torch.ones(3, dtype=torch.int64)}),
])
def test_linear_cross_entropy_more_bad_inputs(backend, error, argument, overrides):
    args = _linear_args(**overrides)
    with pytest.raises(error, match=argument):
        tempnet.tempered_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"),
                                              args.pop("tau"), backend=backend, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "overrides"), [
    (ValueError, "text_features", {"text": torch.randn(5, 3, device=META)}),
    (ValueError, "tau_image", {"tau_image": torch.ones(5, device=META)}),
    (ValueError, "tau_text", {"tau_text": torch.ones(5, device=META)}),
    (TypeError, "text_features", {"text": torch.randn(5, 3, dtype=torch.float64)}),
    (TypeError, "tau_image", {"tau_image": torch.ones(5, dtype=torch.int64)}),
    (ValueError, "tau_image", {"tau_image": torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0])}),
])
def test_contrastive_more_bad_inputs(backend, error, argument, overrides):
    args = {"image": torch.randn(5, 3), "text": torch.randn(5, 3), "tau_image": 0.1, "tau_text": 0.1}
    args.update(overrides)
    with pytest.raises(error, match=argument):
        tempnet.tempered_contrastive_loss(args["image"], args["text"], args["tau_image"], args["tau_text"],
                                          backend=backend, rho=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("error", "argument", "kwargs"), [
    (ValueError, "weight", {"weight": torch.ones(5, device=META)}),
    (TypeError, "weight", {"weight": torch.ones(5, dtype=torch.int64)}),
    (TypeError, "ignore_index", {"ignore_index": None}),
    (TypeError, "rho", {"rho": "1.0"}),
    (ValueError, "tau", {"tau": float("nan")}),
])
def test_cross_entropy_more_bad_inputs(backend, error, argument, kwargs):
    kwargs = dict(kwargs)
    tau = kwargs.pop("tau", 0.5)
    with pytest.raises(error, match=argument):
        tempnet.tempered_cross_entropy(torch.randn(3, 5), torch.tensor([0, 4, 1]), tau, backend=backend, **kwargs)
