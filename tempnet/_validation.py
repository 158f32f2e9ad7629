"""Argument checks of SPEC §5, shared by every backend, and canonicalisation of the inputs.

Every public op runs its inputs through one ``prepare_*`` function here. They raise
``TypeError`` for wrong dtypes and ``ValueError`` for everything else, always naming the argument
and the fix. Value checks (target range, ``tau > 0``) run eagerly on CPU tensors; on CUDA tensors
they become asynchronous device-side asserts so the default path never synchronises. Both can be
switched off for benchmarking with :func:`set_value_checks` or ``TEMPNET_VALUE_CHECKS=0``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tempnet._options import compute_dtype

_FLOATING_LOGITS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_value_checks = os.environ.get("TEMPNET_VALUE_CHECKS", "1") not in ("0", "false", "False")


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent checks (target range, ``tau > 0`` and finite) on or off globally.

    Shape, dtype and device checks always run. Benchmarks that turn value checks off say so.
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether data-dependent value checks currently run."""
    return _value_checks


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`."""
    previous = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_value(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of ``condition`` is true.

    CPU: checked now. CUDA: an asynchronous device-side assert (no host synchronisation).
    """
    if not _value_checks or condition.numel() == 0:
        return
    if condition.device.type == "cpu":
        if not bool(condition.all()):
            raise ValueError(message)
    else:
        torch._assert_async(condition.all(), message)


def check_finite_scalar(value: float | None, name: str, *, positive: bool = False) -> None:
    """Check a Python-number hyper-parameter (``rho``, ``softcap``, a float ``tau``...)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_floating(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOATING_LOGITS:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}; "
            f"cast it with {name}.float()"
        )


def check_same_device(reference: torch.Tensor, reference_name: str, **others: object) -> None:
    for name, other in others.items():
        if isinstance(other, torch.Tensor) and other.device != reference.device:
            raise ValueError(
                f"{name} is on {other.device} but {reference_name} is on {reference.device}; "
                f"move them to the same device"
            )


def canonical_tau(
    tau: float | torch.Tensor, rows_shape: torch.Size, n_rows: int, *, name: str, default_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Return ``tau`` as a 1-D ``(n_rows,)`` tensor (a stride-0 view for a scalar).

    ``tau`` may be a Python number, a 0-d tensor, or a tensor of ``rows_shape`` (a trailing 1
    allowed). Gradients flow back through the view: a scalar tensor receives the sum of the
    per-row gradients (SPEC §1).
    """
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {tau.dtype}; cast it with {name}.float()")
        if tau.device != device:
            raise ValueError(f"{name} is on {tau.device} but the inputs are on {device}; move it to {device}")
        if tau.dim() == 0 or (tau.numel() == 1 and len(rows_shape) == 0):
            rows = tau.reshape(()).expand(n_rows)
        else:
            shape = tuple(tau.shape)
            if shape == (*rows_shape, 1):
                shape = shape[:-1]
            if shape != tuple(rows_shape):
                raise ValueError(
                    f"{name} has shape {tuple(tau.shape)}; expected a scalar or shape {tuple(rows_shape)} "
                    f"(one temperature per row, a trailing 1 allowed)"
                )
            rows = tau.reshape(n_rows)
        check_value(torch.isfinite(rows.detach()), f"{name} must be finite everywhere; got inf or NaN")
        check_value(rows.detach() > 0, f"{name} must be > 0 everywhere; clamp it or predict it with a bounded head")
        return rows
    check_finite_scalar(tau, name, positive=True)
    return torch.full((), float(tau), dtype=default_dtype, device=device).expand(n_rows)


def check_cross_entropy_options(
    *, rho: float | None, ignore_index: int, reduction: str, softcap: float | None, label_smoothing: float,
    class_weight: torch.Tensor | None, class_weight_name: str, z_loss: float, vocab: int, device: torch.device,
) -> None:
    """Checks of the hyper-parameters of SPEC §1 / §1b that do not depend on the data."""
    check_finite_scalar(rho, "rho")
    check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_finite_scalar(softcap, "softcap", positive=True)
    check_finite_scalar(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    check_finite_scalar(z_loss, "z_loss")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if class_weight is not None:
        check_floating(class_weight, class_weight_name)
        check_same_device(torch.empty(0, device=device), "the logits", **{class_weight_name: class_weight})
        if class_weight.shape != (vocab,):
            raise ValueError(
                f"{class_weight_name} must have shape ({vocab},) (one weight per class), "
                f"got {tuple(class_weight.shape)}"
            )


def canonical_target(target: torch.Tensor, rows_shape: torch.Size, vocab: int, ignore_index: int,
                     *, device: torch.device) -> torch.Tensor:
    """Check ``target`` against ``rows_shape`` and ``[0, vocab)``; return it flat as int64."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (int64), got {target.dtype}; use target.long()")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}; move it to {device}")
    if tuple(target.shape) != tuple(rows_shape):
        raise ValueError(
            f"target has shape {tuple(target.shape)} but the logits' leading shape is {tuple(rows_shape)}; "
            f"they must match (logits (..., V), target (...))"
        )
    flat = target.reshape(-1).long()
    in_range = ((flat >= 0) & (flat < vocab)) | (flat == ignore_index)
    check_value(in_range, f"target has values outside [0, {vocab}) that are not ignore_index={ignore_index}")
    return flat


def prepare_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor, *, rho: float | None, ignore_index: int,
    reduction: str, softcap: float | None, label_smoothing: float, weight: torch.Tensor | None, z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate ``tempered_cross_entropy`` inputs.

    Returns ``(logits2d (N, V) with unit column stride, target (N,) int64, tau (N,))``.
    """
    check_floating(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V) with at least one dimension")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError("logits must have at least one class (V >= 1)")
    rows_shape = logits.shape[:-1]
    check_cross_entropy_options(
        rho=rho, ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
        class_weight=weight, class_weight_name="weight", z_loss=z_loss, vocab=vocab, device=logits.device,
    )
    target_flat = canonical_target(target, rows_shape, vocab, ignore_index, device=logits.device)
    logits2d = logits if logits.stride(-1) == 1 else logits.contiguous()
    logits2d = logits2d.reshape(-1, vocab)
    tau_rows = canonical_tau(tau, rows_shape, logits2d.shape[0], name="tau",
                             default_dtype=compute_dtype(logits.dtype), device=logits.device)
    return logits2d, target_flat, tau_rows


def prepare_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    tau: float | torch.Tensor, *, rho: float | None, ignore_index: int, reduction: str, softcap: float | None,
    label_smoothing: float, class_weight: torch.Tensor | None, z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Validate ``tempered_linear_cross_entropy`` inputs.

    Returns ``(hidden2d (N, D), weight (V, D), bias (V,) or None, target (N,) int64, tau (N,))``.
    """
    check_floating(hidden, "hidden")
    check_floating(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D)")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden has D={hidden.shape[-1]} features but weight has shape {tuple(weight.shape)} (V, D); "
            f"they must agree on D"
        )
    if vocab < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    check_same_device(hidden, "hidden", weight=weight, bias=bias)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast them to one dtype")
    if bias is not None:
        check_floating(bias, "bias")
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    rows_shape = hidden.shape[:-1]
    check_cross_entropy_options(
        rho=rho, ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
        class_weight=class_weight, class_weight_name="class_weight", z_loss=z_loss, vocab=vocab, device=hidden.device,
    )
    target_flat = canonical_target(target, rows_shape, vocab, ignore_index, device=hidden.device)
    hidden2d = hidden.reshape(-1, dim)
    tau_rows = canonical_tau(tau, rows_shape, hidden2d.shape[0], name="tau",
                             default_dtype=compute_dtype(hidden.dtype), device=hidden.device)
    return hidden2d, weight, bias, target_flat, tau_rows


def prepare_contrastive(
    image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor,
    tau_text: float | torch.Tensor, *, rho: float | None, reduction: str, n_candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``tempered_contrastive_loss`` inputs; return ``(tau_image (B,), tau_text (B,))``.

    ``n_candidates`` is the size of the (possibly all-gathered) batch that each anchor is
    contrasted against; it defaults to the local batch size.
    """
    check_floating(image_features, "image_features")
    check_floating(text_features, "text_features")
    for name, feats in (("image_features", image_features), ("text_features", text_features)):
        if feats.dim() != 2:
            raise ValueError(f"{name} must have shape (B, D), got {tuple(feats.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            f"must have the same shape (B, D): row i of each is a positive pair"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features is {image_features.dtype} but text_features is {text_features.dtype}; "
            f"cast them to one dtype"
        )
    check_same_device(image_features, "image_features", text_features=text_features)
    check_finite_scalar(rho, "rho")
    check_reduction(reduction)
    batch = image_features.shape[0]
    candidates = batch if n_candidates is None else n_candidates
    if batch < 1:
        raise ValueError("image_features must hold at least one pair (B >= 1)")
    if rho is not None and candidates < 2:
        raise ValueError(
            f"rho is set (DRO loss over negatives) but the batch has B={candidates} < 2 pairs, "
            f"so there are no negatives; use a batch of at least 2 or rho=None"
        )
    dtype = compute_dtype(image_features.dtype)
    rows_shape = torch.Size([batch])
    tau_i = canonical_tau(tau_image, rows_shape, batch, name="tau_image", default_dtype=dtype,
                          device=image_features.device)
    tau_t = canonical_tau(tau_text, rows_shape, batch, name="tau_text", default_dtype=dtype,
                          device=image_features.device)
    return tau_i, tau_t
