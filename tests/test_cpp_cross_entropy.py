"""The C++ backend's cross-entropy ops (``backend="cpp"``) against the PyTorch reference.

float64 gradchecks through the public functions, SPEC §4 parity of float32 / bfloat16 / float16
against a float64 reference, in-place backward, F.cross_entropy equality, and the chunked linear op.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tempnet
from tempnet.backends import cpp_cross_entropy
from tempnet.backends._cpp_build import build_directory, compile_flags, load_extension, source_files

REDUCTIONS = ("mean", "sum", "none")
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}


@pytest.fixture(scope="module", autouse=True)
def _extension() -> None:
    load_extension()


def _options(all_on: bool, vocab: int, dtype: torch.dtype = torch.float64) -> dict:
    if not all_on:
        return {}
    weight = torch.linspace(0.5, 1.5, vocab, dtype=dtype)
    return {"softcap": 4.0, "label_smoothing": 0.1, "weight": weight, "z_loss": 0.05}


def _tau(per_row: bool, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if per_row:
        return (torch.rand(shape, dtype=dtype) + 0.5).requires_grad_()
    return torch.tensor(0.8, dtype=dtype, requires_grad=True)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rho", [None, 1.5])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("all_on", [False, True])
def test_gradcheck_cross_entropy(rho, per_row, reduction, all_on) -> None:
    torch.manual_seed(0)
    shape, vocab = (2, 3), 13
    logits = (torch.randn(*shape, vocab, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randint(0, vocab, shape)
    target[0, 1] = -100
    tau = _tau(per_row, shape, torch.float64)
    options = _options(all_on, vocab)

    def loss(z, t):
        out = tempnet.tempered_cross_entropy(z, target, t, rho=rho, reduction=reduction, backend="cpp", **options)
        return out

    assert torch.autograd.gradcheck(loss, (logits, tau))


def test_gradcheck_cross_entropy_many_blocks() -> None:
    """V spans several column blocks of the kernel (1024 columns each) and is not a power of two."""
    torch.manual_seed(1)
    vocab = 2500
    logits = (torch.randn(3, vocab, dtype=torch.float64) * 3).requires_grad_()
    target = torch.tensor([5, 2499, 1200])
    tau = _tau(True, (3,), torch.float64)
    options = _options(True, vocab)

    def loss(z, t):
        return tempnet.tempered_cross_entropy(z, target, t, rho=2.0, reduction="none", backend="cpp", **options)

    assert torch.autograd.gradcheck(loss, (logits, tau), fast_mode=True)


def _both(logits, target, tau, backend, **kwargs):
    """Loss, lse and gradients (per-row incoming gradient) of ``tempered_cross_entropy``."""
    logits = logits.detach().clone().requires_grad_()
    tau = tau.detach().clone().requires_grad_()
    loss, lse = tempnet.tempered_cross_entropy(logits, target, tau, reduction="none", backend=backend,
                                               return_lse=True, **kwargs)
    g = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * g).sum().backward()
    return loss.detach(), lse, logits.grad, tau.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rho", [None, 2.0])
@pytest.mark.parametrize("all_on", [False, True])
def test_parity_with_float64_reference(dtype, rho, all_on) -> None:
    torch.manual_seed(2)
    n_rows, vocab = 6, 1500
    wide = torch.randn(n_rows, vocab + 37) * 3
    logits = wide[:, :vocab].to(dtype)  # non-contiguous rows when dtype is float32
    target = torch.randint(0, vocab, (n_rows,))
    target[3] = -100
    tau = torch.rand(n_rows) + 0.5
    options = _options(all_on, vocab, torch.float32)
    ours = _both(logits, target, tau, "cpp", rho=rho, **options)
    ref_options = {**options, "weight": options["weight"].double()} if all_on else options
    ref = _both(logits.double(), target, tau.double(), "torch", rho=rho, **ref_options)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert ours[0].dtype == (torch.float32 if dtype != torch.float64 else dtype)
    assert ours[2].dtype == dtype and ours[3].dtype == tau.dtype
    for out, expected, tol in zip(ours, ref, (loss_tol, loss_tol, grad_tol, grad_tol), strict=True):
        assert torch.isfinite(out).all()
        assert _relative_error(out, expected) < tol


def test_non_contiguous_logits_view_is_used_directly() -> None:
    torch.manual_seed(3)
    wide = torch.randn(4, 50)
    logits = wide[:, :37]
    assert logits.stride() == (50, 1)
    target = torch.randint(0, 37, (4,))
    ours = _both(logits, target, torch.full((4,), 0.9), "cpp", rho=1.0)
    ref = _both(logits.contiguous().double(), target, torch.full((4,), 0.9, dtype=torch.float64), "torch", rho=1.0)
    for out, expected in zip(ours, ref, strict=True):
        assert _relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("rho", [None, 1.0])
def test_inplace_backward_reuses_the_logits_buffer(rho) -> None:
    torch.manual_seed(4)
    vocab = 1100
    logits = torch.randn(2, 3, vocab) * 2
    target = torch.randint(0, vocab, (2, 3))
    target[1, 2] = -100
    tau = torch.rand(2, 3) + 0.5
    expected = _both(logits, target, tau, "cpp", rho=rho, softcap=5.0)

    buffer = logits.clone().requires_grad_()
    tau_in = tau.clone().requires_grad_()
    loss = tempnet.tempered_cross_entropy(buffer, target, tau_in, rho=rho, reduction="none", backend="cpp",
                                          softcap=5.0, inplace_backward=True)
    g = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)
    (loss * g).sum().backward()
    assert buffer.grad.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(loss.detach(), expected[0], rtol=0, atol=0)
    torch.testing.assert_close(buffer.grad, expected[2], rtol=0, atol=0)
    torch.testing.assert_close(tau_in.grad, expected[3], rtol=0, atol=0)


def test_inplace_backward_refuses_a_second_backward() -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    loss = tempnet.tempered_cross_entropy(logits * 1.0, torch.tensor([1, 2, 3]), 0.5, backend="cpp",
                                          inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_second_backward_recomputes_without_touching_earlier_gradients() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 30, requires_grad=True)
    target = torch.tensor([0, 5, -100, 29])
    loss = tempnet.tempered_cross_entropy(logits, target, torch.rand(4) + 0.5, reduction="none", backend="cpp")
    (first,) = torch.autograd.grad(loss, logits, torch.full((4,), 0.5), retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, logits, torch.tensor([1.0, 0.0, 3.0, -2.0]))
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(second[1], torch.zeros(30))
    torch.testing.assert_close(second[0], 2.0 * first[0])
    torch.testing.assert_close(second[3], -4.0 * first[3])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_f_cross_entropy_at_unit_temperature(reduction) -> None:
    torch.manual_seed(6)
    vocab = 1030
    logits = torch.randn(2, 5, vocab, dtype=torch.float64)
    target = torch.randint(0, vocab, (2, 5))
    target[0, 0] = -100
    weight = torch.rand(vocab, dtype=torch.float64) + 0.5
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = tempnet.tempered_cross_entropy(ours_in, target, 1.0, reduction=reduction, backend="cpp", weight=weight,
                                          label_smoothing=0.2)
    ref = F.cross_entropy(ref_in.reshape(-1, vocab), target.reshape(-1), weight=weight, label_smoothing=0.2,
                          reduction=reduction)
    torch.testing.assert_close(ours, ref.reshape(ours.shape), rtol=1e-10, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-12)


def test_non_finite_logits_stay_in_their_row() -> None:
    logits = torch.randn(3, 40)
    logits[1, 7] = float("nan")
    logits.requires_grad_()
    loss = tempnet.tempered_cross_entropy(logits, torch.tensor([1, 2, 3]), 0.7, rho=1.0, reduction="none",
                                          backend="cpp")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(logits.grad[[0, 2]]).all()


def test_no_gradient_buffer_without_requires_grad() -> None:
    logits = torch.randn(3, 20)
    loss = tempnet.tempered_cross_entropy(logits, torch.tensor([1, 2, 3]), 0.7, backend="cpp")
    assert loss.grad_fn is None
    with torch.no_grad():
        assert tempnet.tempered_cross_entropy(logits.requires_grad_(), torch.tensor([1, 2, 3]), 0.7,
                                              backend="cpp").grad_fn is None


def test_softcap_tanh_accuracy_over_the_whole_range() -> None:
    """float32: the rational tanh of csrc/common.h within 5e-7 relative (a few ulp) of tanh, odd, |tanh| ≤ 1,
    ±inf → ±1, NaN → NaN, tiny and subnormal inputs returned unchanged; float64: SLEEF's tanh."""
    magnitudes = torch.logspace(-45, 38, 40_001)  # down to float32 subnormals, up to near float32 max
    x = torch.cat([torch.linspace(-12.0, 12.0, 240_001), magnitudes, -magnitudes,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-45, -1e-45])])
    out = torch.ops.tempnet_cpp.softcap_tanh(x)
    ref = torch.tanh(x.double())
    assert out.dtype == torch.float32
    rel = (out.double() - ref).abs() / ref.abs().clamp_min(torch.finfo(torch.float64).tiny)
    assert rel.max() < 5e-7
    assert out.abs().max() <= 1.0
    torch.testing.assert_close(torch.ops.tempnet_cpp.softcap_tanh(-x), -out, rtol=0, atol=0)
    tiny = x.abs() < 1e-4
    assert torch.equal(out[tiny], x[tiny]) and torch.equal(out[tiny].signbit(), x[tiny].signbit())
    assert out[x == float("inf")].eq(1.0).all() and out[x == float("-inf")].eq(-1.0).all()

    nan = torch.tensor([0.5, float("nan"), -2.0, 1.0, 3.0, float("nan"), 7.0, 0.0, -1.0, float("nan"), 2.0])
    out_nan = torch.ops.tempnet_cpp.softcap_tanh(nan)  # 11 elements: full vectors and a partial tail
    assert torch.equal(out_nan.isnan(), nan.isnan())
    torch.testing.assert_close(out_nan[~nan.isnan()], torch.tanh(nan[~nan.isnan()]), rtol=5e-7, atol=0)

    exact = torch.ops.tempnet_cpp.softcap_tanh(x.double())
    torch.testing.assert_close(exact, ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("rho", [None, 2.0])
def test_softcap_with_non_finite_logits(rho) -> None:
    """With a softcap ±inf logits are capped to ±cap (finite loss, zero gradient there); NaN stays in its row."""
    torch.manual_seed(9)
    logits = torch.randn(3, 45) * 3
    logits[0, 4], logits[0, 44] = float("inf"), float("-inf")
    logits[2, 10] = float("nan")
    target = torch.tensor([3, 44, 1])
    tau = torch.tensor([0.7, 1.2, 0.9])
    ours = _both(logits, target, tau, "cpp", rho=rho, softcap=5.0)
    ref = _both(logits.double(), target, tau.double(), "torch", rho=rho, softcap=5.0)
    assert torch.isnan(ours[0][2])
    assert ours[2][0, 4] == 0 and ours[2][0, 44] == 0
    for out, expected, tol in zip(ours, ref, (1e-5, 1e-5, 1e-4, 1e-4), strict=True):
        assert torch.isfinite(out[:2]).all()
        assert _relative_error(out[:2], expected[:2]) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rho", [None, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_vocabulary_matches_the_row_without_the_masked_classes(dtype, rho, weighted) -> None:
    """−inf logits (masked classes) add nothing: loss, lse, ∂/∂z and ∂/∂τ are finite and equal those of the
    row without them (ρ shifted so that ρ − log V is unchanged), ∂/∂z is 0 at the masked classes. Row 0
    masks the whole first block of 1024 columns, row 1 a scattered third of the vocabulary."""
    vocab = 1100
    gen = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(2, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    masks = torch.zeros(2, vocab, dtype=torch.bool)
    masks[0, :1024] = True
    masks[0, 1090:] = True
    masks[1] = torch.rand(vocab, generator=gen) < 1 / 3
    target = torch.tensor([1050, int((~masks[1]).nonzero()[5])])
    logits[masks] = float("-inf")
    tau = torch.tensor([0.3, 1.7], dtype=dtype)
    weight = torch.linspace(0.5, 1.5, vocab, dtype=dtype) if weighted else None
    options = {"z_loss": 1e-2, "weight": weight} if weighted else {}
    loss, lse, grad_logits, grad_tau = _both(logits, target, tau, "cpp", rho=rho, **options)
    tol_loss, tol_grad = (1e-10, 1e-9) if dtype == torch.float64 else TOLERANCES[dtype]
    for row in range(2):
        keep = ~masks[row]
        sub_options = {**options, "weight": weight[keep].double()} if weighted else {}
        sub_rho = None if rho is None else rho - math.log(vocab) + math.log(int(keep.sum()))
        sub_target = keep[:target[row]].sum().reshape(1)
        ref = _both(logits[row:row + 1, keep].double(), sub_target, tau[row:row + 1].double(), "torch", rho=sub_rho,
                    **sub_options)
        ours = (loss[row:row + 1], lse[row:row + 1], grad_logits[row:row + 1, keep], grad_tau[row:row + 1])
        # _both's incoming gradients: (−1, 2) for the two rows here, −1 for the reference's single row.
        grad_scale = (1.0, -2.0)[row]
        for name, out, expected in zip(("loss", "lse", "grad_logits", "grad_tau"), ours, ref, strict=True):
            assert torch.isfinite(out).all(), name
            if name.startswith("grad"):
                assert _relative_error(out, grad_scale * expected) < tol_grad, (row, name)
            else:
                assert _relative_error(out, expected) < tol_loss, (row, name)
        assert (grad_logits[row, masks[row]] == 0).all()


@pytest.mark.parametrize("rho", [None, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("all_on", [False, True])
def test_gradcheck_linear_cross_entropy(monkeypatch, rho, reduction, all_on) -> None:
    monkeypatch.setattr(cpp_cross_entropy, "MIN_CHUNK_ROWS", 2)  # 9 rows in chunks of 4, 4, 1
    torch.manual_seed(7)
    vocab, dim = 7, 3
    hidden = torch.randn(3, 3, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (3, 3))
    target[1, 1] = -100
    tau = _tau(True, (3, 3), torch.float64)
    options = _options(all_on, vocab)
    if all_on:
        options["class_weight"] = options.pop("weight")
    assert cpp_cross_entropy.linear_chunk_rows(9, dim, vocab) == 4

    def loss(h, w, b, t):
        return tempnet.tempered_linear_cross_entropy(h, w, target, t, bias=b, rho=rho, reduction=reduction,
                                                     backend="cpp", **options)

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias, tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("uniform", [True, False])
def test_linear_parity_with_float64_reference(monkeypatch, dtype, uniform) -> None:
    monkeypatch.setattr(cpp_cross_entropy, "MIN_CHUNK_ROWS", 8)
    torch.manual_seed(8)
    n_rows, dim, vocab = 20, 16, 1100
    hidden = torch.randn(n_rows, dim).to(dtype)
    weight = (torch.randn(vocab, dim) * 0.3).to(dtype)
    bias = torch.randn(vocab).to(dtype)
    target = torch.randint(0, vocab, (n_rows,))
    target[4] = -100
    tau = torch.rand(n_rows) + 0.5
    g = torch.full((n_rows,), 0.25) if uniform else torch.linspace(-1.0, 2.0, n_rows)

    def run(backend, cast):
        inputs = [x.detach().to(cast).requires_grad_() for x in (hidden, weight, bias)]
        t = tau.detach().to(cast if cast == torch.float64 else torch.float32).requires_grad_()
        loss = tempnet.tempered_linear_cross_entropy(inputs[0], inputs[1], target, t, bias=inputs[2], rho=2.0,
                                                     reduction="none", backend=backend, softcap=6.0, z_loss=0.01)
        (loss * g.to(loss.dtype)).sum().backward()
        return [loss.detach()] + [x.grad for x in inputs] + [t.grad]

    ours, ref = run("cpp", dtype), run("torch", torch.float64)
    loss_tol, grad_tol = TOLERANCES[dtype]
    for index, (out, expected) in enumerate(zip(ours, ref, strict=True)):
        assert out.dtype == (torch.float32 if index in (0, 4) else dtype)
        assert _relative_error(out, expected) < (loss_tol if index == 0 else grad_tol)


def test_linear_chunk_rule() -> None:
    assert cpp_cross_entropy.linear_chunk_rows(4096, 1024, 32000) == 256
    assert cpp_cross_entropy.linear_chunk_rows(100_000, 4096, 32000) == 12800
    assert cpp_cross_entropy.linear_chunk_rows(10, 4096, 32000) == 10


def test_build_is_cached_and_keyed_on_flags(monkeypatch) -> None:
    assert load_extension() == load_extension()
    monkeypatch.delenv("TEMPNET_CPP_BUILD_DIR", raising=False)
    sources = source_files()
    assert [path.name for path in sources] == sorted(path.name for path in sources)
    assert build_directory(sources, compile_flags()) != build_directory(sources, [*compile_flags(), "-DX"])
