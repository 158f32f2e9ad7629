"""``nn.Module`` wrappers of the three losses, holding their hyper-parameters."""

from __future__ import annotations

import torch
from torch import nn

from tempnet.functional import tempered_contrastive_loss, tempered_cross_entropy, tempered_linear_cross_entropy


class TemperedCrossEntropyLoss(nn.Module):
    """Module form of :func:`tempnet.tempered_cross_entropy`; ``forward(logits, target, tau)``."""

    def __init__(self, *, rho: float | None = None, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", softcap: float | None = None, label_smoothing: float = 0.0,
                 weight: torch.Tensor | None = None, z_loss: float = 0.0) -> None:
        super().__init__()
        self.rho, self.ignore_index, self.reduction, self.backend = rho, ignore_index, reduction, backend
        self.softcap, self.label_smoothing, self.z_loss = softcap, label_smoothing, z_loss
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
        return tempered_cross_entropy(
            logits, target, tau, rho=self.rho, ignore_index=self.ignore_index, reduction=self.reduction,
            backend=self.backend, softcap=self.softcap, label_smoothing=self.label_smoothing, weight=self.weight,
            z_loss=self.z_loss,
        )


class TemperedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`tempnet.tempered_linear_cross_entropy`.

    ``forward(hidden, weight, target, tau, bias=None)``; the classifier is passed in (usually an
    LM head's ``weight``) so the module holds no parameters of its own.
    """

    def __init__(self, *, rho: float | None = None, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", softcap: float | None = None, label_smoothing: float = 0.0,
                 class_weight: torch.Tensor | None = None, z_loss: float = 0.0) -> None:
        super().__init__()
        self.rho, self.ignore_index, self.reduction, self.backend = rho, ignore_index, reduction, backend
        self.softcap, self.label_smoothing, self.z_loss = softcap, label_smoothing, z_loss
        self.register_buffer("class_weight", class_weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                tau: float | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return tempered_linear_cross_entropy(
            hidden, weight, target, tau, bias=bias, rho=self.rho, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend, softcap=self.softcap,
            label_smoothing=self.label_smoothing, class_weight=self.class_weight, z_loss=self.z_loss,
        )


class TemperedContrastiveLoss(nn.Module):
    """Module form of :func:`tempnet.tempered_contrastive_loss`.

    ``forward(image_features, text_features, tau_image, tau_text)``.
    """

    def __init__(self, *, rho: float | None = None, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.rho, self.reduction, self.backend = rho, reduction, backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor,
                tau_text: float | torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return tempered_contrastive_loss(image_features, text_features, tau_image, tau_text, rho=self.rho,
                                         reduction=self.reduction, backend=self.backend)
