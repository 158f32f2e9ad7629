"""The chunked fused linear cross-entropy (kernels/linear_cross_entropy.py) against the float64 reference.

Runs through Triton's CPU interpreter without a GPU (tests/conftest.py). Small ``chunk_rows`` and
``block_v`` force several row chunks and multi-block rows.
"""

import pytest
import torch

import tempnet
from tempnet import reference
from tempnet._options import CEOptions
from tempnet.kernels._chunked_gemm import CHUNK_BYTES, rows_per_chunk
from tempnet.kernels.linear_cross_entropy import linear_cross_entropy_rows

TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_linear(n, dim, vocab, dtype, opts, *, gen, with_bias=True, chunk_rows=4, block_v=16, scalar_tau=False):
    """Compare rows, lse and the gradients w.r.t. hidden, weight, bias and tau (per-row incoming gradient)."""
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[1] = opts.ignore_index
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau_leaf = (torch.tensor(0.8) if scalar_tau else 0.3 + 2 * torch.rand(n, generator=gen)).to(tau_dtype)
    grad_rows = torch.randn(n, generator=gen, dtype=torch.float64)

    leaves = [t for t in (hidden, weight, bias, tau_leaf) if t is not None]
    ref_leaves = [t.double().clone().requires_grad_() for t in leaves]
    got_leaves = [t.clone().requires_grad_() for t in leaves]

    def run(fn, tensors, **kwargs):
        h, w, *rest = tensors
        b = rest[0] if with_bias else None
        t = rest[-1].expand(n) if scalar_tau else rest[-1]
        rows, lse = fn(h, w, b, target, t, opts, **kwargs)
        (rows * grad_rows.to(rows.dtype)).sum().backward()
        return rows, lse

    rows_ref, lse_ref = run(reference.linear_cross_entropy_rows, ref_leaves)
    rows, lse = run(linear_cross_entropy_rows, got_leaves, chunk_rows=chunk_rows, block_v=block_v)
    tol_loss, tol_grad = TOL[dtype]
    assert rows.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(rows, rows_ref) < tol_loss
    assert rel_err(lse, lse_ref) < tol_loss
    for got, want in zip(got_leaves, ref_leaves, strict=True):
        assert got.grad.dtype == got.dtype
        assert rel_err(got.grad, want.grad) < tol_grad


@pytest.mark.parametrize("rho", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference(rho, dtype):
    gen = torch.Generator().manual_seed(1)
    check_linear(9, 12, 37, dtype, CEOptions(rho=rho), gen=gen)


@pytest.mark.parametrize("rho", [None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_options(rho, dtype):
    gen = torch.Generator().manual_seed(2)
    opts = CEOptions(rho=rho, softcap=3.0, label_smoothing=0.1, z_loss=0.01,
                     class_weight=torch.rand(29, generator=gen) + 0.5)
    check_linear(7, 10, 29, dtype, opts, gen=gen, chunk_rows=3, block_v=8)


@pytest.mark.parametrize(("chunk_rows", "block_v", "with_bias", "scalar_tau"),
                         [(1, 8, False, True), (16, None, True, False), (None, 4, True, True)])
def test_chunking_bias_and_scalar_tau(chunk_rows, block_v, with_bias, scalar_tau):
    gen = torch.Generator().manual_seed(3)
    check_linear(6, 8, 21, torch.float32, CEOptions(rho=0.5, ignore_index=-1), gen=gen, with_bias=with_bias,
                 chunk_rows=chunk_rows, block_v=block_v, scalar_tau=scalar_tau)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_op_matches_torch_backend(reduction):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(19, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(19, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 19, (2, 3), generator=gen)
    target[1, 2] = -100
    tau = 0.5 + torch.rand(2, 3, generator=gen, dtype=torch.float64)
    class_weight = torch.rand(19, generator=gen, dtype=torch.float64) + 0.2
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, tau)]
        loss, lse = tempnet.tempered_linear_cross_entropy(
            leaves[0], leaves[1], target, leaves[3], bias=leaves[2], rho=1.5, reduction=reduction, softcap=6.0,
            label_smoothing=0.05, class_weight=class_weight, z_loss=0.001, return_lse=True, backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)).sum().backward()
        results.append([loss, lse, *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-10


def test_only_required_gradients_and_no_grad():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 4, generator=gen).requires_grad_()
    weight = torch.randn(11, 4, generator=gen)
    target = torch.randint(0, 11, (5,), generator=gen)
    tau = torch.full((5,), 0.9)
    rows, _ = linear_cross_entropy_rows(hidden, weight, None, target, tau, CEOptions(), chunk_rows=2)
    rows.sum().backward()
    want = torch.autograd.grad(reference.linear_cross_entropy_rows(hidden, weight, None, target, tau,
                                                                   CEOptions())[0].sum(), hidden)[0]
    assert weight.grad is None
    assert rel_err(hidden.grad, want) < 1e-4
    with torch.no_grad():
        rows, lse = linear_cross_entropy_rows(hidden, weight, None, target, tau, CEOptions())
    assert not rows.requires_grad and not lse.requires_grad


def test_rows_per_chunk_rule():
    assert rows_per_chunk(10, 50, 4) == 10
    assert rows_per_chunk(10**6, 128_256, 2) == (CHUNK_BYTES // (128_256 * 2)) // 128 * 128
    assert rows_per_chunk(10**6, 128_256, 2) * 128_256 * 2 <= CHUNK_BYTES
    assert rows_per_chunk(5, CHUNK_BYTES, 4) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    """GPU twin of the tests above with default chunking and block sizes."""
    gen = torch.Generator().manual_seed(6)
    n, dim, vocab = 300, 64, 50_257
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / 4).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    tau = 0.5 + torch.rand(n, generator=gen)
    opts = CEOptions(rho=1.0, z_loss=1e-3)
    refs = [t.double().requires_grad_() for t in (hidden, weight, tau)]
    rows_ref, _ = reference.linear_cross_entropy_rows(refs[0], refs[1], None, target, refs[2], opts)
    rows_ref.sum().backward()
    gots = [t.cuda().requires_grad_() for t in (hidden, weight, tau)]
    rows, _ = linear_cross_entropy_rows(gots[0], gots[1], None, target.cuda(), gots[2], opts, chunk_rows=128)
    rows.sum().backward()
    assert rel_err(rows.cpu(), rows_ref) < TOL[dtype][0]
    for got, want in zip(gots, refs, strict=True):
        assert rel_err(got.grad.cpu(), want.grad) < TOL[dtype][1]
