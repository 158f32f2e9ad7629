"""The C++ backend and the Triton backend (interpreter) on the same inputs, both against the reference.

The reference is the truth (SPEC §4 tolerances); the two fused backends must also agree with each
other to float32 accuracy, which catches a shared misreading of the SPEC that a loose tolerance
against the reference could hide.
"""

import pytest
import torch

import tempnet

OPTIONS = [{}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(backend, logits, target, tau, **kwargs):
    z = logits.detach().clone().requires_grad_()
    t = tau.detach().clone().requires_grad_()
    loss, lse = tempnet.tempered_cross_entropy(z, target, t, backend=backend, return_lse=True, reduction="none",
                                               **kwargs)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return loss.detach(), lse, z.grad, t.grad


@pytest.mark.parametrize("rho", [None, 1.5])
@pytest.mark.parametrize("options", OPTIONS)
def test_cross_entropy_cpp_matches_triton(rho, options):
    gen = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(7, 45, generator=gen)
    target = torch.randint(0, 45, (7,), generator=gen)
    target[3] = -100
    tau = 0.3 + torch.rand(7, generator=gen)
    weight = torch.rand(45, generator=gen) + 0.5 if options else None
    outs = {b: _run(b, logits, target, tau, rho=rho, weight=weight, **options) for b in ("torch", "cpp", "triton")}
    reference = _run("torch", logits.double(), target, tau.double(), rho=rho,
                     weight=None if weight is None else weight.double(), **options)
    for name in ("cpp", "triton"):
        for got, want, tol in zip(outs[name], reference, (1e-5, 1e-5, 1e-4, 1e-4), strict=True):
            assert _rel(got, want) < tol, name
    for got_cpp, got_triton in zip(outs["cpp"], outs["triton"], strict=True):
        assert _rel(got_cpp, got_triton) < 1e-5


@pytest.mark.parametrize("rho", [None, 0.7])
def test_contrastive_cpp_matches_triton(rho):
    gen = torch.Generator().manual_seed(6)
    image, text = torch.randn(9, 12, generator=gen), torch.randn(9, 12, generator=gen)
    tau_i, tau_t = 0.2 + torch.rand(9, generator=gen), 0.2 + torch.rand(9, generator=gen)
    grads = {}
    for backend in ("cpp", "triton"):
        leaves = [x.clone().requires_grad_() for x in (image, text, tau_i, tau_t)]
        loss = tempnet.tempered_contrastive_loss(*leaves, rho=rho, backend=backend)
        loss.backward()
        grads[backend] = [loss.detach()] + [leaf.grad for leaf in leaves]
    for got_cpp, got_triton in zip(grads["cpp"], grads["triton"], strict=True):
        assert _rel(got_cpp, got_triton) < 1e-5
