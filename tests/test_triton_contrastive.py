"""Triton contrastive kernels (``kernels/contrastive.py``) against the float64 reference (SPEC §2, §4).

On CPU the kernels run through the Triton interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), so shapes stay tiny; tile sizes are forced small to cover partial tiles,
several candidate tiles and several feature chunks.
"""

import pytest
import torch
import torch.nn.functional as F

import tempnet
from tempnet import reference
from tempnet.kernels.contrastive import Tiles, contrastive_side

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2),
       torch.float64: (1e-10, 1e-9)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _features(rows: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    feats = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    return feats.to(dtype).to(DEVICE).requires_grad_()


def _for_device(tiles: Tiles | None) -> Tiles | None:
    """The interpreter takes any tile; a GPU's ``tl.dot`` needs every size ≥ 16."""
    if tiles is None or DEVICE == "cpu":
        return tiles
    sizes = (max(16, size) for size in (tiles.block_m, tiles.block_n, tiles.block_d))
    return Tiles(*sizes, num_warps=tiles.num_warps)


def _side_case(n_anchor, n_cand, offset, dim, dtype, rho, tiles, seed=0):
    """Run the kernel and the float64 reference (on the same rounded inputs); return errors."""
    gen = torch.Generator().manual_seed(seed)
    anchors = _features(n_anchor, dim, dtype, gen)
    candidates = _features(n_cand, dim, dtype, gen)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau = (0.05 + 0.5 * torch.rand(n_anchor, generator=gen, dtype=torch.float64)).to(DEVICE, tau_dtype).requires_grad_()
    weights = torch.linspace(0.5, 1.5, n_anchor, dtype=torch.float64)

    # Half the anchors per backward chunk: several chunks, the last one partial for odd b.
    out = contrastive_side(anchors, candidates, tau, offset=offset, rho=rho, tiles=_for_device(tiles),
                           chunk_rows=max(1, n_anchor // 2))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(out, (anchors, candidates, tau), weights.to(out))
    assert [g.dtype for g in grads] == [dtype, dtype, tau_dtype]

    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in (anchors, candidates, tau)]
    ref = reference.contrastive_side(*ref_inputs, offset=offset, rho=rho)
    ref_grads = torch.autograd.grad(ref, ref_inputs, weights)
    for tensor in (out, *grads):
        assert torch.isfinite(tensor).all()
    return rel_err(out.cpu(), ref), [rel_err(g.cpu(), r) for g, r in zip(grads, ref_grads, strict=True)]


# (anchors b, candidates B, offset, D, tiles): B = 2; B not a multiple of the tile; several
# candidate tiles and feature chunks (D = 20 with 8-wide chunks); the rectangular b < B case.
SIDE_CASES = [
    (2, 2, 0, 8, Tiles(8, 8, 8)),
    (5, 5, 0, 20, Tiles(8, 8, 8)),
    (17, 17, 0, 8, Tiles(8, 8, 8)),
    (3, 17, 7, 20, Tiles(8, 16, 16)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rho", [None, 0.7])
@pytest.mark.parametrize("case", SIDE_CASES, ids=lambda c: f"b{c[0]}-B{c[1]}-off{c[2]}-D{c[3]}")
def test_side_matches_reference(case, rho, dtype):
    n_anchor, n_cand, offset, dim, tiles = case
    loss_tol, grad_tol = TOL[dtype]
    loss_err, grad_errs = _side_case(n_anchor, n_cand, offset, dim, dtype, rho, tiles)
    assert loss_err < loss_tol
    assert max(grad_errs) < grad_tol, grad_errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("rho", [None, 0.7])
def test_side_other_dtypes(dtype, rho):
    loss_tol, grad_tol = TOL[dtype]
    loss_err, grad_errs = _side_case(4, 9, 3, 20, dtype, rho, Tiles(8, 8, 16), seed=1)
    assert loss_err < loss_tol
    assert max(grad_errs) < grad_tol, grad_errs


def test_side_wide_features_default_tiles():
    """D = 300 spans several 128-wide feature chunks with the default tiles."""
    loss_err, grad_errs = _side_case(3, 6, 2, 300, torch.float32, 0.4, None, seed=2)
    assert loss_err < 1e-5
    assert max(grad_errs) < 1e-4, grad_errs


def test_side_saves_no_similarity_matrix():
    """Only inputs and O(b) statistics are kept for the backward pass (never the (b, B) matrix)."""
    gen = torch.Generator().manual_seed(3)
    anchors, candidates = _features(4, 8, torch.float32, gen), _features(12, 8, torch.float32, gen)
    tau = torch.full((4,), 0.3, device=DEVICE, requires_grad=True)
    out = contrastive_side(anchors, candidates, tau, offset=2, rho=0.5)
    saved = out.grad_fn.saved_tensors
    assert all(t.numel() <= 12 * 8 for t in saved)
    assert sum(t.numel() for t in saved if t.numel() not in (4 * 8, 12 * 8)) <= 3 * 4


def test_side_offset_out_of_range():
    gen = torch.Generator().manual_seed(4)
    anchors, candidates = _features(3, 8, torch.float32, gen), _features(4, 8, torch.float32, gen)
    with pytest.raises(ValueError, match="offset"):
        contrastive_side(anchors, candidates, torch.ones(3, device=DEVICE), offset=2, rho=None)


@pytest.mark.parametrize("rho", [None, 0.7])
def test_non_finite_anchor_stays_in_its_row(rho):
    gen = torch.Generator().manual_seed(5)
    anchors = _features(5, 8, torch.float32, gen).detach().clone()
    anchors[2, 3] = float("nan")
    candidates = _features(7, 8, torch.float32, gen)
    out = contrastive_side(anchors, candidates, torch.full((5,), 0.2, device=DEVICE), offset=1, rho=rho)
    assert torch.isnan(out[2])
    assert torch.isfinite(out[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_anchor_tau", [True, False])
@pytest.mark.parametrize("rho", [None, 0.5])
@pytest.mark.parametrize(("batch", "dim"), [(2, 8), (5, 20), (17, 8)])
def test_public_op_matches_reference(batch, dim, rho, per_anchor_tau, dtype):
    """``tempered_contrastive_loss(backend="triton")``: value and the four gradients (SPEC §2)."""
    gen = torch.Generator().manual_seed(batch * 100 + dim)
    wide = F.normalize(torch.randn(batch, dim + 3, generator=gen, dtype=torch.float64), dim=-1)
    image = wide.to(dtype).to(DEVICE).requires_grad_()  # used as image[:, :dim]: row stride D + 3
    text = _features(batch, dim, dtype, gen)
    if per_anchor_tau:
        tau_i = (0.05 + 0.5 * torch.rand(batch, generator=gen)).to(DEVICE).requires_grad_()
        tau_t = (0.05 + 0.5 * torch.rand(batch, generator=gen)).to(DEVICE).requires_grad_()
    else:
        tau_i = torch.tensor(0.07, device=DEVICE, requires_grad=True)
        tau_t = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    inputs = (image, text, tau_i, tau_t)
    loss = tempnet.tempered_contrastive_loss(image[:, :dim], text, tau_i, tau_t, rho=rho, backend="triton")
    grads = torch.autograd.grad(loss, inputs)

    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in inputs]
    ref = tempnet.tempered_contrastive_loss(ref_inputs[0][:, :dim], *ref_inputs[1:], rho=rho, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(loss.cpu(), ref) < loss_tol
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad.cpu(), ref_grad) < grad_tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rho", [None, 0.7])
def test_side_cuda_default_tiles(dtype, rho):
    """On a GPU: default tiles, bf16 tensor-core dots, several tiles of every kind."""
    loss_tol, grad_tol = TOL[dtype]
    loss_err, grad_errs = _side_case(150, 333, 100, 512, dtype, rho, None, seed=6)
    assert loss_err < loss_tol
    assert max(grad_errs) < grad_tol, grad_errs
