"""The PyTorch reference against SPEC §1, §1b and §2: gradcheck, closed forms, F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

import tempnet

REDUCTIONS = ["mean", "sum", "none"]


def _ce_inputs(shape=(2, 3), vocab=7, *, per_row_tau=True, ignore=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, vocab, shape, generator=gen)
    if ignore:
        target.view(-1)[1] = -100
    if per_row_tau:
        tau = (0.3 + 2 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    else:
        tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    return logits, target, tau


def _scalar(out):
    return out if out.dim() == 0 else (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()


@pytest.mark.parametrize("rho", [None, 1.3])
@pytest.mark.parametrize("per_row_tau", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradcheck(rho, per_row_tau, reduction):
    logits, target, tau = _ce_inputs(per_row_tau=per_row_tau)

    def fn(z, t):
        return _scalar(tempnet.tempered_cross_entropy(z, target, t, rho=rho, reduction=reduction, backend="torch"))

    assert torch.autograd.gradcheck(fn, (logits, tau))


@pytest.mark.parametrize("rho", [None, 0.8])
def test_cross_entropy_gradcheck_all_options(rho):
    logits, target, tau = _ce_inputs(shape=(5,), vocab=6)
    weight = torch.rand(6, dtype=torch.float64) + 0.2

    def fn(z, t):
        loss = tempnet.tempered_cross_entropy(z, target, t, rho=rho, softcap=4.0, label_smoothing=0.2, weight=weight,
                                              z_loss=0.01, backend="torch")
        return loss

    assert torch.autograd.gradcheck(fn, (logits, tau))


@pytest.mark.parametrize("rho", [None, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_gradcheck(rho, reduction):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (2, 3), generator=gen)
    target[0, 2] = -100
    tau = (0.5 + torch.rand(2, 3, 1, generator=gen, dtype=torch.float64)).requires_grad_()

    def fn(h, w, b, t):
        out = tempnet.tempered_linear_cross_entropy(h, w, target, t, bias=b, rho=rho, reduction=reduction,
                                                    backend="torch")
        return _scalar(out)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias, tau))


@pytest.mark.parametrize("rho", [None, 1.0])
@pytest.mark.parametrize("per_sample_tau", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_contrastive_gradcheck(rho, per_sample_tau, reduction):
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    text = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    if per_sample_tau:
        tau_i = (0.2 + torch.rand(5, generator=gen, dtype=torch.float64)).requires_grad_()
        tau_t = (0.2 + torch.rand(5, generator=gen, dtype=torch.float64)).requires_grad_()
    else:
        tau_i = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        tau_t = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def fn(x, t, ti, tt):
        out = tempnet.tempered_contrastive_loss(x, t, ti, tt, rho=rho, reduction=reduction, backend="torch")
        if reduction == "none":
            return _scalar(out[0]) + 2 * _scalar(out[1])
        return out

    assert torch.autograd.gradcheck(fn, (image, text, tau_i, tau_t))


def test_dro_cross_entropy_closed_forms():
    """SPEC §1: ∂L/∂τ_i = H(p_i) − log V + ρ and ∂L/∂z = p − onehot (τ cancels)."""
    logits, target, tau = _ce_inputs(shape=(6,), vocab=11, ignore=False)
    rho = 1.7
    loss = tempnet.tempered_cross_entropy(logits, target, tau, rho=rho, reduction="sum", backend="torch")
    loss.backward()
    p = torch.softmax(logits.detach() / tau.detach()[:, None], -1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(tau.grad, entropy - math.log(11) + rho, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits.grad, p - F.one_hot(target, 11).double(), rtol=1e-12, atol=1e-12)


def test_dro_cross_entropy_value_matches_definition():
    logits, target, tau = _ce_inputs(shape=(4,), vocab=5, ignore=False)
    rho = 0.9
    got = tempnet.tempered_cross_entropy(logits, target, tau, rho=rho, reduction="none", backend="torch")
    z, t = logits.detach(), tau.detach()
    shifted = (z - z.gather(1, target[:, None])) / t[:, None]
    want = t * torch.log(shifted.exp().mean(-1)) + rho * t
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plain_cross_entropy_closed_forms():
    """SPEC §1: ∂ℓ/∂z = (p − onehot)/τ and ∂ℓ/∂τ = −(Σ p z − z_y)/τ²."""
    logits, target, tau = _ce_inputs(shape=(6,), vocab=11, ignore=False)
    tempnet.tempered_cross_entropy(logits, target, tau, reduction="sum", backend="torch").backward()
    z, t = logits.detach(), tau.detach()
    p = torch.softmax(z / t[:, None], -1)
    torch.testing.assert_close(logits.grad, (p - F.one_hot(target, 11).double()) / t[:, None])
    torch.testing.assert_close(tau.grad, -((p * z).sum(-1) - z.gather(1, target[:, None]).squeeze(1)) / t**2)


def test_dro_contrastive_tau_closed_form():
    """SPEC §2: ∂LI_i/∂τI_i = H(w_i) − log(B−1) + ρ with w_i the softmax over negatives."""
    gen = torch.Generator().manual_seed(3)
    batch, rho = 6, 2.2
    image = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    tau_i = (0.3 + torch.rand(batch, generator=gen, dtype=torch.float64)).requires_grad_()
    loss_image, _ = tempnet.tempered_contrastive_loss(image, text, tau_i, 0.5, rho=rho, reduction="none",
                                                      backend="torch")
    loss_image.sum().backward()
    sim = image @ text.T
    shifted = (sim - sim.diag()[:, None]) / tau_i.detach()[:, None]
    shifted = shifted.masked_fill(torch.eye(batch, dtype=torch.bool), float("-inf"))
    w = torch.softmax(shifted, -1)
    entropy = -(w * torch.where(w > 0, w.log(), 0.0)).sum(-1)
    torch.testing.assert_close(tau_i.grad, entropy - math.log(batch - 1) + rho)


def test_contrastive_matches_clip_loss_at_fixed_tau():
    gen = torch.Generator().manual_seed(4)
    image = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    logits = image @ text.T / 0.07
    labels = torch.arange(7)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = tempnet.tempered_contrastive_loss(image, text, 0.07, 0.07, backend="torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("use_weight", [False, True])
def test_plain_tau_one_equals_torch_cross_entropy(reduction, label_smoothing, use_weight):
    logits, target, _ = _ce_inputs(shape=(9,), vocab=6)
    weight = torch.rand(6, dtype=torch.float64) + 0.1 if use_weight else None
    got = tempnet.tempered_cross_entropy(logits, target, 1.0, reduction=reduction, weight=weight,
                                         label_smoothing=label_smoothing, backend="torch")
    want = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(_scalar(got), logits)
    (g_want,) = torch.autograd.grad(_scalar(want), logits)
    torch.testing.assert_close(g_got, g_want)


def test_options_definitions():
    """SPEC §1b by hand: softcap, smoothing over ℓ_k, z-loss, and the lse output."""
    logits, target, tau = _ce_inputs(shape=(4,), vocab=5, ignore=False)
    z, t, y = logits.detach(), tau.detach(), target
    cap, eps, lam, rho = 2.0, 0.3, 0.05, 0.6
    capped = cap * torch.tanh(z / cap)
    u = capped / t[:, None]
    lse = torch.logsumexp(u, -1)
    nll = lse[:, None] - u
    dro = t[:, None] * nll + t[:, None] * (rho - math.log(5))
    want = (1 - eps) * dro.gather(1, y[:, None]).squeeze(1) + eps / 5 * dro.sum(-1) + lam * lse**2
    got, got_lse = tempnet.tempered_cross_entropy(z, y, t, rho=rho, softcap=cap, label_smoothing=eps, z_loss=lam,
                                                  reduction="none", return_lse=True, backend="torch")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, lse)


def test_mean_with_every_row_ignored_is_zero_with_zero_gradients():
    logits, _, tau = _ce_inputs(shape=(3,), vocab=4)
    target = torch.full((3,), -100)
    for rho in (None, 1.0):
        logits.grad = tau.grad = None
        loss = tempnet.tempered_cross_entropy(logits, target, tau, rho=rho, backend="torch")
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(logits.grad, torch.zeros_like(logits))
        assert torch.equal(tau.grad, torch.zeros_like(tau))


def test_ignored_rows_get_zero_gradient_even_with_nonfinite_logits():
    logits, target, tau = _ce_inputs(shape=(4,), vocab=5, ignore=False)
    with torch.no_grad():
        logits[2, 1] = float("nan")
    target[2] = -100
    loss = tempnet.tempered_cross_entropy(logits, target, tau, rho=0.5, backend="torch")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(logits.grad[2], torch.zeros(5, dtype=torch.float64))
    assert tau.grad[2] == 0


def test_loss_dtype_and_gradient_dtypes_for_half_inputs():
    logits = torch.randn(4, 10, dtype=torch.bfloat16, requires_grad=True)
    tau = torch.full((4,), 0.8, requires_grad=True)
    loss = tempnet.tempered_cross_entropy(logits, torch.tensor([1, 2, 3, 4]), tau, rho=1.0, backend="torch")
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and tau.grad.dtype == torch.float32


def test_scalar_tau_gets_sum_of_row_gradients():
    logits, target, tau_rows = _ce_inputs(shape=(5,), vocab=6)
    tau_rows = torch.full((5,), 0.9, dtype=torch.float64, requires_grad=True)
    tau_scalar = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    for tau in (tau_rows, tau_scalar):
        tempnet.tempered_cross_entropy(logits, target, tau, rho=1.1, backend="torch").backward()
    torch.testing.assert_close(tau_scalar.grad, tau_rows.grad.sum())


def test_modules_wrap_functions():
    logits, target, tau = _ce_inputs()
    module = tempnet.TemperedCrossEntropyLoss(rho=0.5, reduction="sum", backend="torch")
    torch.testing.assert_close(module(logits, target, tau),
                               tempnet.tempered_cross_entropy(logits, target, tau, rho=0.5, reduction="sum",
                                                              backend="torch"))
    hidden, weight = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 5, -100])
    linear = tempnet.TemperedLinearCrossEntropyLoss(backend="torch")
    torch.testing.assert_close(linear(hidden, weight, target, 0.5),
                               tempnet.tempered_cross_entropy(hidden @ weight.T, target, 0.5, backend="torch"))
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    contrastive = tempnet.TemperedContrastiveLoss(rho=1.0, backend="torch")
    torch.testing.assert_close(contrastive(image, text, 0.1, 0.2),
                               tempnet.tempered_contrastive_loss(image, text, 0.1, 0.2, rho=1.0, backend="torch"))
