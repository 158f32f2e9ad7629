"""The fused Triton cross-entropy (kernels/cross_entropy.py) against the float64 reference (SPEC §1, §1b, §4).

Runs through Triton's CPU interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` without a
GPU). Small ``block_v`` values force rows to stream over several blocks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tempnet
from tempnet import reference
from tempnet._options import CEOptions
from tempnet.kernels.cross_entropy import cross_entropy_rows

# SPEC §4: (loss, gradient) tolerances of ‖out − ref‖ / ‖ref‖ against a float64 reference.
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-2, 2e-2)}
REDUCTIONS = ["mean", "sum", "none"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_opts(vocab: int, gen: torch.Generator, *, rho=None, softcap=False, smoothing=False, weight=False,
              z_loss=False, **kwargs) -> CEOptions:
    return CEOptions(
        rho=rho, softcap=2.5 if softcap else None, label_smoothing=0.15 if smoothing else 0.0,
        class_weight=torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.3 if weight else None,
        z_loss=0.02 if z_loss else 0.0, **kwargs,
    )


def check_rows(n, vocab, dtype, opts, *, gen, block_v=16, scalar_tau=False, row_stride=None, tau_dtype=None):
    """Compare rows, lse and the gradients w.r.t. logits and tau with a per-row incoming gradient."""
    row_stride = vocab if row_stride is None else row_stride
    storage = (4 * torch.randn(n, row_stride, generator=gen, dtype=torch.float64)).to(dtype)
    logits = storage[:, :vocab]
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[n // 2] = opts.ignore_index
    tau_dtype = tau_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    if scalar_tau:
        tau_leaf = torch.tensor(0.7, dtype=tau_dtype, requires_grad=True)
        tau_ref_leaf = tau_leaf.detach().double().requires_grad_()
        tau, tau_ref = tau_leaf.expand(n), tau_ref_leaf.expand(n)
    else:
        tau_leaf = (0.3 + 2 * torch.rand(n, generator=gen)).to(tau_dtype).requires_grad_()
        tau_ref_leaf = tau_leaf.detach().double().requires_grad_()
        tau, tau_ref = tau_leaf, tau_ref_leaf
    grad_rows = torch.randn(n, generator=gen, dtype=torch.float64)

    logits_ref = logits.detach().double().requires_grad_()
    rows_ref, lse_ref = reference.cross_entropy_rows(logits_ref, target, tau_ref, opts)
    (rows_ref * grad_rows).sum().backward()

    logits = logits.detach().requires_grad_()
    rows, lse = cross_entropy_rows(logits, target, tau, opts, block_v=block_v)
    (rows * grad_rows.to(rows.dtype)).sum().backward()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert rows.dtype == acc and lse.dtype == acc
    assert logits.grad.dtype == dtype and tau_leaf.grad.dtype == tau_dtype
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(rows, rows_ref) < tol_loss
    assert rel_err(lse, lse_ref) < tol_loss
    assert rel_err(logits.grad, logits_ref.grad) < tol_grad
    assert rel_err(tau_leaf.grad, tau_ref_leaf.grad) < tol_grad
    ignored = target == opts.ignore_index
    assert (rows[ignored] == 0).all() and (lse[ignored] == 0).all() and (logits.grad[ignored] == 0).all()


@pytest.mark.parametrize("rho", [None, 1.2])
@pytest.mark.parametrize("option", ["softcap", "smoothing", "weight", "z_loss"])
def test_each_option_alone(rho, option):
    gen = torch.Generator().manual_seed(1)
    opts = make_opts(37, gen, rho=rho, **{option: True})
    check_rows(6, 37, torch.float32, opts, gen=gen)


@pytest.mark.parametrize("rho", [None, 0.9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("all_options", [False, True])
def test_matches_reference(rho, dtype, all_options):
    gen = torch.Generator().manual_seed(2)
    flags = dict(softcap=True, smoothing=True, weight=True, z_loss=True) if all_options else {}
    opts = make_opts(45, gen, rho=rho, **flags)
    check_rows(7, 45, dtype, opts, gen=gen)


@pytest.mark.parametrize(("vocab", "block_v"), [(1, 16), (5, 16), (16, 16), (29, 8), (100, None)])
def test_vocab_sizes_and_blocks(vocab, block_v):
    gen = torch.Generator().manual_seed(3)
    check_rows(5, vocab, torch.float32, make_opts(vocab, gen, rho=0.5, smoothing=True, z_loss=True), gen=gen,
               block_v=block_v)


@pytest.mark.parametrize("rho", [None, 1.0])
def test_scalar_tau_and_strided_logits(rho):
    gen = torch.Generator().manual_seed(4)
    opts = make_opts(23, gen, rho=rho, weight=True, smoothing=True)
    check_rows(6, 23, torch.float32, opts, gen=gen, scalar_tau=True, row_stride=31)
    check_rows(6, 23, torch.bfloat16, opts, gen=gen, row_stride=40, tau_dtype=torch.float32)


def test_float16_and_custom_ignore_index():
    gen = torch.Generator().manual_seed(5)
    check_rows(5, 19, torch.float16, make_opts(19, gen, rho=0.7, ignore_index=3, softcap=True), gen=gen)


@pytest.mark.parametrize("rho", [None, 1.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_public_op_reductions(rho, reduction):
    gen = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(2, 3, 21, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 21, (2, 3), generator=gen)
    target[0, 1] = -100
    tau = 0.4 + torch.rand(2, 3, 1, generator=gen, dtype=torch.float64)
    weight = torch.rand(21, generator=gen, dtype=torch.float64) + 0.5
    kwargs = dict(rho=rho, reduction=reduction, softcap=5.0, label_smoothing=0.1, weight=weight, z_loss=0.01,
                  return_lse=True)
    results = []
    for backend in ("triton", "torch"):
        z, t = logits.clone().requires_grad_(), tau.clone().requires_grad_()
        loss, lse = tempnet.tempered_cross_entropy(z, target, t, backend=backend, **kwargs)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)).sum().backward()
        results.append((loss, lse, z.grad, t.grad))
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_f_cross_entropy_at_unit_temperature(reduction):
    gen = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(9, 33, generator=gen)
    target = torch.randint(0, 33, (9,), generator=gen)
    target[[2, 5]] = 4
    weight = torch.rand(33, generator=gen) + 0.2
    kwargs = dict(weight=weight, label_smoothing=0.2, ignore_index=4, reduction=reduction)
    z, z_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = tempnet.tempered_cross_entropy(z, target, 1.0, backend="triton", **kwargs)
    loss_ref = F.cross_entropy(z_ref, target, **kwargs)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    loss_ref.sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_reuses_logits_buffer(dtype):
    gen = torch.Generator().manual_seed(8)
    logits = (3 * torch.randn(6, 27, generator=gen)).to(dtype)
    target = torch.randint(0, 27, (6,), generator=gen)
    target[1] = -100
    tau = 0.5 + torch.rand(6, generator=gen)
    opts = CEOptions(rho=0.8, z_loss=0.01, inplace_backward=True)
    grad_rows = torch.randn(6, generator=gen)

    z_ref = logits.double().requires_grad_()
    rows_ref, _ = reference.cross_entropy_rows(z_ref, target, tau.double(), opts)
    (rows_ref * grad_rows.double()).sum().backward()

    z = logits.clone().requires_grad_()
    rows, _ = cross_entropy_rows(z, target, tau, opts, block_v=8)
    grad = torch.autograd.grad((rows * grad_rows).sum(), z)[0]
    assert grad.data_ptr() == z.data_ptr() and grad.dtype == dtype
    assert rel_err(rows, rows_ref) < TOL[dtype][0]
    assert rel_err(grad, z_ref.grad) < TOL[dtype][1]


def test_inplace_through_public_op_and_double_backward_raises():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 3, 10, generator=gen)
    target = torch.randint(0, 10, (4, 3), generator=gen)
    expected = F.cross_entropy(logits.view(-1, 10), target.view(-1))
    z = logits.clone().requires_grad_()
    loss = tempnet.tempered_cross_entropy(z, target, 1.0, backend="triton", inplace_backward=True)
    torch.testing.assert_close(loss, expected)
    loss.backward(retain_graph=True)
    assert z.grad.data_ptr() == z.data_ptr()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_double_backward_without_inplace():
    """Backward recomputes the gradient from the saved logits, so ``retain_graph`` works."""
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(5, 37, generator=gen, requires_grad=True)
    target = torch.randint(0, 37, (5,), generator=gen)
    tau = (0.5 + torch.rand(5, generator=gen)).requires_grad_()
    loss = tempnet.tempered_cross_entropy(logits, target, tau, rho=1.0, backend="triton")
    first = torch.autograd.grad(loss, (logits, tau), retain_graph=True)
    second = torch.autograd.grad(loss, (logits, tau))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_only_where_required():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 12, generator=gen)
    target = torch.randint(0, 12, (5,), generator=gen)
    tau = (0.5 + torch.rand(5, generator=gen)).requires_grad_()
    rows, _ = cross_entropy_rows(logits, target, tau, CEOptions(rho=0.5))
    rows.sum().backward()
    rows_ref, _ = reference.cross_entropy_rows(logits.double(), target, tau.detach().double().requires_grad_(),
                                               CEOptions(rho=0.5))
    assert rel_err(rows, rows_ref) < 1e-5
    with torch.no_grad():
        rows_nograd, lse = cross_entropy_rows(logits.requires_grad_(), target, tau, CEOptions())
    assert not rows_nograd.requires_grad and not lse.requires_grad


def test_all_rows_ignored_and_masked_vocab():
    target = torch.full((3,), -100)
    z = torch.randn(3, 8).requires_grad_()
    loss = tempnet.tempered_cross_entropy(z, target, 0.5, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()

    logits = torch.randn(4, 20, dtype=torch.float64)
    logits[:, 5:12] = float("-inf")  # masked classes: finite loss, zero gradient there
    logits[1, :16] = float("-inf")
    target = torch.tensor([1, 17, 3, 19])
    tau = torch.full((4,), 0.8, dtype=torch.float64)
    grad_rows = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    for rho in (None, 0.5):
        z, z_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        rows, _ = cross_entropy_rows(z, target, tau, CEOptions(rho=rho), block_v=8)
        rows_ref, _ = reference.cross_entropy_rows(z_ref, target, tau, CEOptions(rho=rho))
        (rows * grad_rows).sum().backward()
        (rows_ref * grad_rows).sum().backward()
        assert torch.isfinite(rows).all() and torch.isfinite(z.grad).all()
        assert rel_err(rows, rows_ref) < 1e-10
        assert rel_err(z.grad, z_ref.grad) < 1e-9


def test_non_finite_logits_stay_in_their_row():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    rows, lse = cross_entropy_rows(logits, torch.tensor([0, 1, 2]), torch.ones(3), CEOptions(), block_v=4)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(lse[[0, 2]]).all()


def test_int64_row_offsets():
    """Row 1 starts 2^31 elements into the buffer (4 GiB of bfloat16, only two rows ever touched)."""
    vocab, stride = 24, 2**31
    buffer = torch.empty(stride + vocab, dtype=torch.bfloat16)
    logits = buffer.as_strided((2, vocab), (stride, 1))
    values = torch.randn(2, vocab, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    logits.copy_(values)
    target = torch.tensor([3, 20])
    z = logits.requires_grad_()
    rows, _ = cross_entropy_rows(z, target, torch.full((2,), 0.9), CEOptions(inplace_backward=True), block_v=8)
    rows.sum().backward()
    z_ref = values.double().requires_grad_()
    rows_ref, _ = reference.cross_entropy_rows(z_ref, target, torch.full((2,), 0.9, dtype=torch.float64),
                                               CEOptions())
    rows_ref.sum().backward()
    assert rel_err(rows, rows_ref) < 1e-2
    assert rel_err(z.grad, z_ref.grad) < 2e-2
    assert torch.equal(z.detach(), z.grad)  # the strided view itself now holds the gradient


def test_plain_tau_gradient_closed_form():
    """SPEC §1: ∂ℓ/∂τ = −(Σ p z − z_y)/τ² and, in DRO mode, H(p) − log V + ρ."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 30, (4,), generator=gen)
    tau = (0.5 + torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_()
    p = torch.softmax(logits / tau.detach()[:, None], -1)
    plain = torch.autograd.grad(cross_entropy_rows(logits, target, tau, CEOptions(), block_v=8)[0].sum(), tau)[0]
    want = -((p * logits).sum(-1) - logits.gather(1, target[:, None]).squeeze(1)) / tau.detach() ** 2
    torch.testing.assert_close(plain, want, rtol=1e-10, atol=1e-12)
    dro = torch.autograd.grad(cross_entropy_rows(logits, target, tau, CEOptions(rho=2.0), block_v=8)[0].sum(), tau)[0]
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(dro, entropy - math.log(30) + 2.0, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_vocab(dtype):
    """GPU twin of the tests above at a 262,144-class vocabulary with the default block size."""
    gen = torch.Generator().manual_seed(13)
    vocab = 262_144
    opts = make_opts(vocab, gen, rho=1.0, softcap=True, smoothing=True, weight=True, z_loss=True)
    opts_cuda = CEOptions(**{**opts.__dict__, "class_weight": opts.class_weight.cuda()})
    logits = (4 * torch.randn(8, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (8,), generator=gen)
    target[3] = -100
    tau = 0.3 + torch.rand(8, generator=gen)
    z_ref, t_ref = logits.double().requires_grad_(), tau.double().requires_grad_()
    rows_ref, _ = reference.cross_entropy_rows(z_ref, target, t_ref, opts)
    rows_ref.sum().backward()
    z, t = logits.cuda().requires_grad_(), tau.cuda().requires_grad_()
    rows, _ = cross_entropy_rows(z, target.cuda(), t, opts_cuda)
    rows.sum().backward()
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(rows.cpu(), rows_ref) < tol_loss
    assert rel_err(z.grad.cpu(), z_ref.grad) < tol_grad
    assert rel_err(t.grad.cpu(), t_ref.grad) < tol_grad
