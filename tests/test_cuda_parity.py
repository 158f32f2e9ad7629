"""The Triton backend compiled for a real GPU against the float64 reference (SPEC §1, §1b, §2, §2b, §4).

CI has no GPU, so these tests run only where CUDA is available (the interpreter tests cover the
same kernels there). They go through the public ops with ``backend="triton"`` and the default
block sizes, at shapes that stream rows over several blocks (vocabularies up to 262,144, not
powers of two), with ignored rows, scalar and per-row temperatures, non-contiguous logits,
every SPEC §1b option, the in-place backward and every half-precision dtype.
"""

import pytest
import torch
import torch.nn.functional as F

import tempnet
from tempnet.global_contrastive import GlobalContrastiveLoss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# SPEC §4: (loss, gradient) tolerances of ‖out − ref‖ / ‖ref‖ against a float64 reference.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}
OPTION_SETS = {
    "plain": {},
    "dro": {"rho": 1.5},
    "all_plain": {"softcap": 20.0, "label_smoothing": 0.1, "weight": True, "z_loss": 1e-3},
    "all_dro": {"rho": 1.5, "softcap": 20.0, "label_smoothing": 0.1, "weight": True, "z_loss": 1e-3},
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _options(name: str, vocab: int, gen: torch.Generator) -> dict:
    options = dict(OPTION_SETS[name])
    if options.pop("weight", False):
        options["weight"] = 0.5 + torch.rand(vocab, generator=gen, dtype=torch.float64)
    return options


def _on(options: dict, device: str, dtype: torch.dtype, key: str = "weight") -> dict:
    if key in options:
        return {**options, key: options[key].to(device, dtype)}
    return options


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize(("n_rows", "vocab"), [(37, 1000), (96, 50_257), (6, 262_144)])
def test_cross_entropy(n_rows, vocab, options, dtype):
    """Loss, lse and both gradients; the logits are a column slice (row stride V + 5)."""
    gen = torch.Generator().manual_seed(vocab + n_rows)
    opts = _options(options, vocab, gen)
    storage = (3 * torch.randn(n_rows, vocab + 5, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab, (n_rows,), generator=gen)
    target[n_rows // 3] = -100
    tau = 0.4 + 1.5 * torch.rand(n_rows, generator=gen)
    row_grad = torch.rand(n_rows, generator=gen, dtype=torch.float64)

    ref_storage, ref_tau = storage.double().requires_grad_(), tau.double().requires_grad_()
    ref_loss, ref_lse = tempnet.tempered_cross_entropy(
        ref_storage[:, :vocab], target, ref_tau, reduction="none", return_lse=True, backend="torch",
        **_on(opts, "cpu", torch.float64))
    (ref_loss * row_grad).sum().backward()

    gpu_storage, gpu_tau = storage.cuda().requires_grad_(), tau.cuda().requires_grad_()
    loss, lse = tempnet.tempered_cross_entropy(
        gpu_storage[:, :vocab], target.cuda(), gpu_tau, reduction="none", return_lse=True, backend="triton",
        **_on(opts, "cuda", torch.float32))
    (loss * row_grad.cuda()).sum().backward()

    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref_loss) < tol_loss
    assert rel_err(lse, ref_lse) < tol_loss
    assert lse[n_rows // 3].item() == 0.0
    assert rel_err(gpu_storage.grad, ref_storage.grad) < tol_grad
    assert rel_err(gpu_tau.grad, ref_tau.grad) < tol_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_scalar_tau_3d_inplace(reduction, dtype):
    """A 0-d temperature, ``(B, T, V)`` logits, the in-place backward and a reduction."""
    gen = torch.Generator().manual_seed(11)
    logits = (2 * torch.randn(3, 21, 32_003, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, 32_003, (3, 21), generator=gen)
    target[1, :4] = -100
    ref_logits, ref_tau = logits.double().requires_grad_(), torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    ref = tempnet.tempered_cross_entropy(ref_logits, target, ref_tau, rho=2.0, reduction=reduction, backend="torch")
    ref.backward()

    gpu_logits = logits.cuda()
    gpu_tau = torch.tensor(0.8, device="cuda", requires_grad=True)
    leaf = gpu_logits.clone().requires_grad_()
    loss = tempnet.tempered_cross_entropy(leaf * 1, target.cuda(), gpu_tau, rho=2.0, reduction=reduction,
                                          backend="triton", inplace_backward=True)
    loss.backward()
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref) < tol_loss
    assert rel_err(leaf.grad, ref_logits.grad) < tol_grad
    assert rel_err(gpu_tau.grad, ref_tau.grad) < tol_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_plain_tau_one_matches_f_cross_entropy(weighted, smoothing, dtype):
    """At τ = 1 without DRO the fused GPU op is ``F.cross_entropy`` (SPEC §1b), values and gradients."""
    gen = torch.Generator().manual_seed(5)
    vocab = 50_257
    logits = (3 * torch.randn(64, vocab, generator=gen)).to(dtype).cuda()
    target = torch.randint(0, vocab, (64,), generator=gen).cuda()
    target[7] = -100
    weight = (0.5 + torch.rand(vocab, generator=gen)).cuda() if weighted else None
    want_leaf = logits.float().clone().requires_grad_()
    got_leaf = logits.clone().requires_grad_()
    want = F.cross_entropy(want_leaf, target, weight=weight, label_smoothing=smoothing)
    want.backward()
    got = tempnet.tempered_cross_entropy(got_leaf, target, 1.0, weight=weight, label_smoothing=smoothing,
                                         backend="triton")
    got.backward()
    assert rel_err(got, want) < 1e-5
    assert rel_err(got_leaf.grad, want_leaf.grad) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", ["dro", "all_plain", "all_dro"])
@pytest.mark.parametrize(("n_rows", "dim", "vocab", "bias"), [(300, 64, 50_257, False), (129, 256, 32_000, True)])
def test_linear_cross_entropy(n_rows, dim, vocab, bias, options, dtype):
    """Loss, lse and the gradients of hidden, weight, bias and τ, with default chunking."""
    gen = torch.Generator().manual_seed(dim + vocab)
    opts = _options(options, vocab, gen)
    if "weight" in opts:
        opts["class_weight"] = opts.pop("weight")
    inputs = [torch.randn(n_rows, dim, generator=gen, dtype=torch.float64).to(dtype),
              (torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / dim**0.25).to(dtype),
              (0.1 * torch.randn(vocab, generator=gen, dtype=torch.float64)).to(dtype),
              0.5 + torch.rand(n_rows, generator=gen)]
    target = torch.randint(0, vocab, (n_rows,), generator=gen)
    target[::17] = -100

    def run(tensors, device, weight_dtype, backend):
        leaves = [t.to(device).requires_grad_() for t in tensors]
        hidden, weight, bias_t, tau = leaves
        loss, lse = tempnet.tempered_linear_cross_entropy(
            hidden, weight, target.to(device), tau, bias=bias_t if bias else None, reduction="sum",
            return_lse=True, backend=backend, **_on(opts, device, weight_dtype, "class_weight"))
        loss.backward()
        return loss, lse, [leaf.grad for leaf in leaves if leaf.grad is not None]

    ref_loss, ref_lse, ref_grads = run([t.double() for t in inputs], "cpu", torch.float64, "torch")
    loss, lse, grads = run(inputs, "cuda", torch.float32, "triton")
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref_loss) < tol_loss
    assert rel_err(lse, ref_lse) < tol_loss
    assert len(grads) == len(ref_grads) == (4 if bias else 3)
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < tol_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rho", [None, 0.7])
@pytest.mark.parametrize(("batch", "dim"), [(300, 768), (1000, 96)])
def test_contrastive(batch, dim, rho, dtype):
    """The symmetric contrastive loss and its four gradients, per-anchor temperatures."""
    gen = torch.Generator().manual_seed(batch + dim)
    inputs = [F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype),
              F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype),
              0.03 + 0.1 * torch.rand(batch, generator=gen), 0.03 + 0.1 * torch.rand(batch, generator=gen)]
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    ref = tempnet.tempered_contrastive_loss(*ref_leaves, rho=rho, backend="torch")
    ref.backward()
    leaves = [t.cuda().requires_grad_() for t in inputs]
    loss = tempnet.tempered_contrastive_loss(*leaves, rho=rho, backend="triton")
    loss.backward()
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref) < tol_loss
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert rel_err(leaf.grad, ref_leaf.grad) < tol_grad


def test_global_contrastive_two_steps():
    """Two SogCLR steps on the GPU (Triton per-anchor losses) equal the same steps in float64 on CPU."""
    gen = torch.Generator().manual_seed(9)
    batch, dim, size = 64, 128, 200
    losses = {"cpu": GlobalContrastiveLoss(dataset_size=size, gamma=0.8, rho=0.5, backend="torch").double(),
              "cuda": GlobalContrastiveLoss(dataset_size=size, gamma=0.8, rho=0.5, backend="triton").cuda()}
    for step in range(2):
        inputs = [F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1),
                  F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1),
                  0.05 + 0.1 * torch.rand(batch, generator=gen, dtype=torch.float64),
                  0.05 + 0.1 * torch.rand(batch, generator=gen, dtype=torch.float64)]
        indices = torch.randperm(size, generator=gen)[:batch] if step == 0 else torch.arange(batch)
        results = {}
        for device, module in losses.items():
            dtype = torch.float64 if device == "cpu" else torch.float32
            leaves = [t.to(device, dtype).clone().requires_grad_() for t in inputs]
            value = module(*leaves, indices.to(device))
            value.backward()
            results[device] = (value, [leaf.grad for leaf in leaves])
        ref_value, ref_grads = results["cpu"]
        value, grads = results["cuda"]
        assert rel_err(value, ref_value) < 1e-5
        for got, want in zip(grads, ref_grads, strict=True):
            assert rel_err(got, want) < 1e-4
        assert rel_err(losses["cuda"].log_u_image, losses["cpu"].log_u_image) < 1e-5
