"""GlobalContrastiveLoss (SPEC §2b) against the SPEC formulas written out directly in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import tempnet
from tempnet.global_contrastive import GlobalContrastiveLoss

RHO = 0.3


def _batch(batch=5, dim=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    tau_i = 0.1 + 0.4 * torch.rand(batch, generator=gen, dtype=torch.float64)
    tau_t = 0.1 + 0.4 * torch.rand(batch, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (image, text, tau_i, tau_t)]


def _expected_step(image, text, tau_i, tau_t, indices, u_state, seen, gamma, rho):
    """SPEC §2b written out without autograd or logs of sums; updates ``u_state`` / ``seen``.

    Returns ``(value, (d_image, d_text, d_tau_image, d_tau_text))``.
    """
    x, t, ti, tt = (v.detach() for v in (image, text, tau_i, tau_t))
    batch = x.shape[0]
    off_diagonal = 1.0 - torch.eye(batch, dtype=torch.float64)
    value = 0.0
    grads = [torch.zeros_like(x), torch.zeros_like(t), None, None]
    for side, (sim, tau) in enumerate(((x @ t.T, ti), (t @ x.T, tt))):
        diff = sim - sim.diagonal()[:, None]
        expo = torch.exp(diff / tau[:, None]) * off_diagonal
        g = expo.sum(1) / (batch - 1)
        u_old = u_state[side][indices]
        u = torch.where(seen[indices], (1 - gamma) * u_old + gamma * g, g)
        u_state[side][indices] = u
        value += 0.5 * (tau * torch.log(u) + rho * tau).mean()
        d_sim = expo / ((batch - 1) * u[:, None])
        d_sim = d_sim - torch.diag(d_sim.sum(1))
        d_tau = torch.log(u) + rho - (expo * diff / tau[:, None]).sum(1) / ((batch - 1) * u)
        scale = 0.5 / batch
        anchors, candidates = (0, 1) if side == 0 else (1, 0)
        feats = (x, t)
        grads[anchors] += scale * d_sim @ feats[candidates]
        grads[candidates] += scale * d_sim.T @ feats[anchors]
        grads[2 + side] = scale * d_tau
    seen[indices] = True
    return value, grads


def _step(module, batch, indices):
    loss = module(*batch, indices)
    return loss, torch.autograd.grad(loss, batch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("per_anchor_tau", [True, False])
def test_gamma_one_is_the_minibatch_dro_loss(backend, per_anchor_tau):
    module = GlobalContrastiveLoss(dataset_size=20, gamma=1.0, rho=RHO, backend=backend).double()
    image, text, tau_i, tau_t = _batch()
    if not per_anchor_tau:
        tau_i = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        tau_t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    inputs = [image, text, tau_i, tau_t]
    for indices in (torch.tensor([3, 1, 17, 0, 8]), torch.tensor([1, 9, 3, 4, 2])):  # revisits too
        loss, grads = _step(module, inputs, indices)
        ref = tempnet.tempered_contrastive_loss(*inputs, rho=RHO, backend="torch")
        ref_grads = torch.autograd.grad(ref, inputs)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_two_steps_match_spec_formulas():
    gamma = 0.6
    module = GlobalContrastiveLoss(dataset_size=8, gamma=gamma, rho=RHO, backend="torch").double()
    u_state = [torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)]
    seen = torch.zeros(8, dtype=torch.bool)
    for step, indices in enumerate((torch.tensor([0, 2, 4, 1, 7]), torch.tensor([2, 5, 0, 3, 7]))):
        batch = _batch(seed=step)
        loss, grads = _step(module, batch, indices)
        value, expected = _expected_step(*batch, indices, u_state, seen, gamma, RHO)
        torch.testing.assert_close(loss.detach(), value, rtol=1e-12, atol=1e-12)
        for grad, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module.log_u_image, torch.log(u_state[0]).where(seen, 0.0))
        torch.testing.assert_close(module.log_u_text, torch.log(u_state[1]).where(seen, 0.0))
        assert torch.equal(module.seen, seen)


def test_float32_features_follow_the_float64_formulas():
    module = GlobalContrastiveLoss(dataset_size=8, gamma=0.5, rho=RHO, backend="torch")
    u_state = [torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)]
    seen = torch.zeros(8, dtype=torch.bool)
    for step, indices in enumerate((torch.tensor([0, 2, 4, 1, 7]), torch.tensor([2, 5, 0, 3, 7]))):
        batch = _batch(seed=step, dtype=torch.float32)
        loss, grads = _step(module, [x.detach().float().requires_grad_() for x in batch], indices)
        value, expected = _expected_step(*[x.double() for x in batch], indices, u_state, seen, 0.5, RHO)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - value.item()) / abs(value.item()) < 1e-5
        for grad, want in zip(grads, expected, strict=True):
            assert ((grad.double() - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("dataset_size", [8, None])
def test_state_dict_round_trip(dataset_size):
    def fresh():
        return GlobalContrastiveLoss(dataset_size=dataset_size, gamma=0.7, rho=RHO, backend="torch").double()

    first = fresh()
    _step(first, _batch(seed=0), torch.tensor([6, 1, 3, 0, 2]))
    state = first.state_dict()
    assert set(state) == {"log_u_image", "log_u_text", "seen"}
    second = fresh()
    second.load_state_dict(state)
    batch, indices = _batch(seed=1), torch.tensor([2, 5, 6, 7, 0])
    loss_a, grads_a = _step(first, batch, indices)
    loss_b, grads_b = _step(second, batch, indices)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])


def test_state_grows_without_dataset_size():
    module = GlobalContrastiveLoss(gamma=0.5, rho=RHO, backend="torch").double()
    assert module.seen.numel() == 0
    _step(module, _batch(), torch.tensor([0, 40, 3, 2, 1]))
    assert module.seen.numel() >= 41
    assert module.seen.nonzero().flatten().tolist() == [0, 1, 2, 3, 40]
    assert torch.isfinite(module.log_u_image[[0, 1, 2, 3, 40]]).all()


def test_first_visit_and_moving_average_in_log_space():
    """A repeated batch: ``log u`` moves from ``log g`` towards the new estimate by logaddexp."""
    gamma = 0.25
    module = GlobalContrastiveLoss(dataset_size=5, gamma=gamma, rho=RHO, backend="torch").double()
    indices = torch.arange(5)
    first = _batch(seed=0)
    losses, _ = tempnet.tempered_contrastive_loss(*first, rho=RHO, reduction="none", backend="torch")
    _step(module, first, indices)
    log_g1 = losses.detach() / first[2].detach() - RHO
    torch.testing.assert_close(module.log_u_image, log_g1)
    second = _batch(seed=1)
    losses, _ = tempnet.tempered_contrastive_loss(*second, rho=RHO, reduction="none", backend="torch")
    _step(module, second, indices)
    log_g2 = losses.detach() / second[2].detach() - RHO
    want = torch.log((1 - gamma) * torch.exp(log_g1) + gamma * torch.exp(log_g2))
    torch.testing.assert_close(module.log_u_image, want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gamma": 0.0, "rho": RHO}, "gamma"), ({"gamma": 1.5, "rho": RHO}, "gamma"),
     ({"gamma": math.nan, "rho": RHO}, "gamma"), ({"gamma": 0.5, "rho": math.inf}, "rho"),
     ({"gamma": 0.5, "rho": None}, "rho"), ({"gamma": 0.5, "rho": RHO, "dataset_size": 0}, "dataset_size"),
     ({"gamma": 0.5, "rho": RHO, "backend": "cuda"}, "backend")],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalContrastiveLoss(**kwargs)


@pytest.mark.parametrize(
    ("indices", "error", "message"),
    [(torch.tensor([0, 1, 2, 3]), ValueError, "shape"), (torch.tensor([0.0, 1, 2, 3, 4]), TypeError, "integer"),
     (torch.tensor([0, 1, 2, 3, 9]), ValueError, "outside"), (torch.tensor([0, 1, -1, 3, 4]), ValueError, "outside"),
     (torch.tensor([0, 1, 1, 3, 4]), ValueError, "distinct"), ([0, 1, 2, 3, 4], TypeError, "indices")],
)
def test_bad_indices(indices, error, message):
    module = GlobalContrastiveLoss(dataset_size=9, gamma=0.5, rho=RHO, backend="torch")
    with pytest.raises(error, match=message):
        module(*_batch(dtype=torch.float32), indices)


def test_bad_features_are_named():
    module = GlobalContrastiveLoss(dataset_size=9, gamma=0.5, rho=RHO, backend="torch")
    image, text, tau_i, tau_t = _batch()
    with pytest.raises(ValueError, match="tau_text"):
        module(image, text, tau_i, -tau_t, torch.arange(5))
    with pytest.raises(ValueError, match="text_features"):
        module(image, text[:4], tau_i, tau_t, torch.arange(5))
