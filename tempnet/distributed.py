"""Contrastive losses over a batch split across processes (``torch.distributed``).

Each rank holds ``b`` pairs of a global batch of ``B = world_size · b`` pairs. Features are
all-gathered *with gradient* (``torch.distributed.nn.functional.all_gather``, whose backward sums
the gradients of every rank's copy back onto its owner), and each rank scores only its LOCAL
anchors against the GLOBAL batch (open_clip's ``local_loss`` convention). With
``reduction="mean"`` each rank returns the mean over its local anchors, so the mean of the rank
losses is the single-process loss of the whole batch and, after DDP averages the parameter
gradients across ranks, they equal the single-process gradients. The gradients each rank sees on
its own (local) features and temperatures are ``world_size`` times the single-process ones.

Every rank must hold the same number of pairs (checked with one small all-gather when value
checks are on, see :func:`tempnet.set_value_checks`). Without an initialised process group the
functions run on the local batch alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from tempnet._validation import prepare_contrastive, value_checks_enabled
from tempnet.dispatch import choose_backend
from tempnet.functional import reduce_contrastive


def world_and_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``, or ``(1, 0)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0, differentiably.

    The backward pass sums the gradient of each rank's slice across ranks and returns it to the
    rank that owns the slice.
    """
    if world_and_rank(group)[0] == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor, group=group), dim=0)


def all_gather_no_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0, without gradient."""
    world, _ = world_and_rank(group)
    if world == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def check_equal_local_batches(batch: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` unless every rank of ``group`` holds ``batch`` pairs.

    One all-gather of a single integer (a host synchronisation); skipped when value checks are
    off (:func:`tempnet.set_value_checks`).
    """
    world, rank = world_and_rank(group)
    if world == 1 or not value_checks_enabled():
        return
    sizes = all_gather_no_grad(torch.tensor([batch], dtype=torch.int64, device=device), group).tolist()
    if any(size != batch for size in sizes):
        raise ValueError(
            f"image_features: every rank must hold the same number of pairs, got local batch sizes {sizes} "
            f"(rank {rank} has {batch}); use a sampler with drop_last=True"
        )


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor | None = None,
    tau_text: float | torch.Tensor | None = None, *, group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor | None, float | torch.Tensor | None]:
    """All-gather features ``(b, D)`` and per-anchor temperatures ``(b,)`` with gradient.

    Returns ``(image (B, D), text (B, D), tau_image, tau_text)`` in rank order, ``B = world · b``.
    Temperatures that are ``None``, Python floats or 0-d tensors are shared by all anchors and
    returned unchanged.
    """
    def gather_tau(tau: float | torch.Tensor | None) -> float | torch.Tensor | None:
        if isinstance(tau, torch.Tensor) and tau.dim() > 0:
            return all_gather_with_grad(tau, group)
        return tau

    return (all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group),
            gather_tau(tau_image), gather_tau(tau_text))


def distributed_tempered_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor,
    tau_text: float | torch.Tensor, *, rho: float | None = None, reduction: str = "mean", backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`tempnet.tempered_contrastive_loss` of the local anchors against the global batch.

    Args:
        image_features, text_features: ``(b, D)`` local pairs of this rank (same ``b`` on every rank).
        tau_image, tau_text: float or ``(b,)`` temperatures of the local image / text anchors.
        rho: ``None`` for InfoNCE, or the DRO ρ; the negatives are the other ``world · b − 1``
            candidates of the global batch.
        reduction: ``"mean"`` over the local anchors (``½(mean LI + mean LT)``), ``"sum"`` over
            them, or ``"none"`` for the local ``(LI, LT)``, each ``(b,)``.
        backend: as in :func:`tempnet.tempered_contrastive_loss`.
        group: the process group (default: the world).

    Returns:
        This rank's loss; see the module docstring for how it relates to the single-process loss.
    """
    world, rank = world_and_rank(group)
    batch = image_features.shape[0] if isinstance(image_features, torch.Tensor) and image_features.dim() == 2 else 0
    tau_i, tau_t = prepare_contrastive(image_features, text_features, tau_image, tau_text, rho=rho,
                                       reduction=reduction, n_candidates=world * batch)
    check_equal_local_batches(batch, image_features.device, group)
    all_image, all_text, _, _ = gather_features(image_features, text_features, group=group)
    module = choose_backend(backend, image_features.device).module
    offset = rank * batch
    loss_image = module.contrastive_side(image_features, all_text, tau_i, offset=offset, rho=rho)
    loss_text = module.contrastive_side(text_features, all_image, tau_t, offset=offset, rho=rho)
    return reduce_contrastive(loss_image, loss_text, reduction)
