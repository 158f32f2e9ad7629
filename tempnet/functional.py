"""The public ops of SPEC §1 and §2: validation, backend dispatch and the reduction.

Backends compute per-row values (see :mod:`tempnet.backends`); the reductions of the SPEC live
here, once, for every backend.
"""

from __future__ import annotations

import torch

from tempnet._options import CEOptions
from tempnet._validation import prepare_contrastive, prepare_cross_entropy, prepare_linear_cross_entropy
from tempnet.dispatch import choose_backend


def reduce_rows(rows: torch.Tensor, target: torch.Tensor, opts: CEOptions, reduction: str,
                rows_shape: torch.Size) -> torch.Tensor:
    """Apply the reduction of SPEC §1 / §1b to per-row losses ``rows (N,)``.

    ``"mean"`` divides the sum by ``Σ w_{y_i}`` over non-ignored rows (their count without class
    weights); with no such rows (or a zero weight sum) the loss is ``0``, never NaN.
    """
    if reduction == "none":
        return rows.reshape(rows_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    valid = target != opts.ignore_index
    if opts.class_weight is None:
        denominator = valid.sum().to(rows.dtype)
    else:
        safe_target = torch.where(valid, target, 0)
        weights = opts.class_weight.to(rows.dtype)[safe_target]
        denominator = torch.where(valid, weights, 0.0).sum()
    return total / torch.where(denominator != 0, denominator, 1.0)


def tempered_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor, *, rho: float | None = None,
    ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", softcap: float | None = None,
    label_smoothing: float = 0.0, weight: torch.Tensor | None = None, z_loss: float = 0.0,
    return_lse: bool = False, inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits / tau`` with a per-row temperature, plain or DRO (SPEC §1, §1b).

    Args:
        logits: ``(..., V)`` float16 / bfloat16 / float32 / float64, any strides.
        target: ``(...)`` int64 class indices in ``[0, V)`` or ``ignore_index``.
        tau: a float, a 0-d tensor or a ``(...)`` tensor (trailing 1 allowed), every value > 0.
        rho: ``None`` for tempered CE; a float ρ for the KL-constrained DRO loss
            ``τ·lse((z − z_y)/τ) − τ log V + ρ τ``. Keep ρ below ``log V``.
        ignore_index: rows with this target contribute 0 and get zero gradient.
        reduction: ``"mean"`` (over non-ignored rows, weighted by class weight), ``"sum"`` or
            ``"none"`` (shape of ``target``).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"`` (see :mod:`tempnet.dispatch`).
        softcap, label_smoothing, weight, z_loss: the options of SPEC §1b.
        return_lse: also return the per-row ``lse(z/τ)`` (shape of ``target``, 0 at ignored rows).
        inplace_backward: let a fused backend overwrite ``logits`` with their gradient (the C++
            backend during the forward pass, Triton during backward), saving one ``(N, V)``
            buffer. ``logits`` must not be read after this call; one backward pass only.

    Returns:
        The loss, float32 for half-precision logits, else the logits' dtype; with
        ``return_lse`` a pair ``(loss, lse)``.
    """
    logits2d, target1d, tau_rows = prepare_cross_entropy(
        logits, target, tau, rho=rho, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
        label_smoothing=label_smoothing, weight=weight, z_loss=z_loss,
    )
    opts = CEOptions(rho=rho, ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing,
                     class_weight=weight, z_loss=z_loss, inplace_backward=inplace_backward)
    module = choose_backend(backend, logits.device).module
    rows, lse = module.cross_entropy_rows(logits2d, target1d, tau_rows, opts)
    loss = reduce_rows(rows, target1d, opts, reduction, target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def tempered_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor, *,
    bias: torch.Tensor | None = None, rho: float | None = None, ignore_index: int = -100,
    reduction: str = "mean", backend: str = "auto", softcap: float | None = None, label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None, z_loss: float = 0.0, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`tempered_cross_entropy` of ``hidden @ weight.T + bias`` without holding the logits.

    Args:
        hidden: ``(..., D)``; weight: ``(V, D)`` classifier (same dtype); bias: ``(V,)`` or ``None``.
        class_weight: the per-class weights of SPEC §1b (called ``weight`` in
            :func:`tempered_cross_entropy`; renamed here because ``weight`` is the classifier).
        Everything else as in :func:`tempered_cross_entropy`.

    The fused backends process rows in chunks, so the ``(N, V)`` logits never exist at once.
    """
    hidden2d, weight, bias, target1d, tau_rows = prepare_linear_cross_entropy(
        hidden, weight, bias, target, tau, rho=rho, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, label_smoothing=label_smoothing, class_weight=class_weight, z_loss=z_loss,
    )
    opts = CEOptions(rho=rho, ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing,
                     class_weight=class_weight, z_loss=z_loss)
    module = choose_backend(backend, hidden.device).module
    rows, lse = module.linear_cross_entropy_rows(hidden2d, weight, bias, target1d, tau_rows, opts)
    loss = reduce_rows(rows, target1d, opts, reduction, target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def reduce_contrastive(loss_image: torch.Tensor, loss_text: torch.Tensor, reduction: str,
                       n_anchors: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2 reduction: ``½(mean LI + mean LT)``, ``½(Σ LI + Σ LT)`` or the pair ``(LI, LT)``.

    ``n_anchors`` overrides the count that ``"mean"`` divides by (the local batch by default).
    """
    if reduction == "none":
        return loss_image, loss_text
    if reduction == "sum":
        return 0.5 * (loss_image.sum() + loss_text.sum())
    count = loss_image.shape[0] if n_anchors is None else n_anchors
    return 0.5 * (loss_image.sum() + loss_text.sum()) / count


def tempered_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor,
    tau_text: float | torch.Tensor, *, rho: float | None = None, reduction: str = "mean", backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Symmetric contrastive loss with a temperature per image and per text anchor (SPEC §2).

    Args:
        image_features, text_features: ``(B, D)`` each, used as given (normalise them first);
            row ``i`` of both is a positive pair.
        tau_image: float or ``(B,)``, temperature of image anchor ``i`` (row ``i`` of ``s``).
        tau_text: float or ``(B,)``, temperature of text anchor ``j`` (column ``j`` of ``s``).
        rho: ``None`` for InfoNCE (positive in the denominator), or ρ for the DRO loss over the
            negatives only (needs ``B >= 2``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (returns ``(LI, LT)``, each ``(B,)``).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    The fused backends never store the ``(B, B)`` similarity matrix: Triton recomputes it in backward
    in row chunks of at most 256 MiB, C++ in tiles.
    """
    tau_i, tau_t = prepare_contrastive(image_features, text_features, tau_image, tau_text, rho=rho,
                                       reduction=reduction)
    module = choose_backend(backend, image_features.device).module
    loss_image = module.contrastive_side(image_features, text_features, tau_i, offset=0, rho=rho)
    loss_text = module.contrastive_side(text_features, image_features, tau_t, offset=0, rho=rho)
    return reduce_contrastive(loss_image, loss_text, reduction)
