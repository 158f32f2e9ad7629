"""TempNet temperature heads of SPEC §3 (Qiu et al., ICML 2024).

Both heads predict ``τ = τ_min + (τ_max − τ_min)·σ(o)``, so ``τ ∈ (τ_min, τ_max)`` always, and
both detach their input: the stop-gradient rule of SPEC §1 is built in, so the model that
produced the input is never trained through the temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bounded_temperature(raw: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    """Map an unbounded score ``raw`` to ``τ_min + (τ_max − τ_min)·σ(raw)`` (same shape)."""
    return tau_min + (tau_max - tau_min) * torch.sigmoid(raw)


def _check_bounds(tau_min: float, tau_max: float) -> None:
    if not (0 < tau_min < tau_max and math.isfinite(tau_max)):
        raise ValueError(f"need 0 < tau_min < tau_max < inf, got tau_min={tau_min}, tau_max={tau_max}")


class _PrototypeAttentionOutput(nn.Module):
    """``o = w·((a − 1/M) ⊙ v) + b`` with ``a = softmax(q / exp(s))`` (SPEC §3, both heads)."""

    def __init__(self, width: int, log_scale_init: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale_init)))
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(scores / self.log_scale.exp(), dim=-1)
        centred = attention - 1.0 / scores.shape[-1]
        return (centred * values) @ self.weight + self.bias


class TempNet(nn.Module):
    """TempNet for language models: one temperature per token (SPEC §3, LM head).

    ``x = normalize(sg(input))``; ``h = W2·dropout(σ(W1 x))``; ``a = softmax(h / exp(s))``;
    ``o = w·((a − 1/M) ⊙ h) + b``; ``τ = τ_min + (τ_max − τ_min)·σ(o)``.

    Args:
        in_features: size of the input's last dimension (``V`` for logits, ``D`` for hidden states).
        width: ``M``, the hidden width (paper: 256).
        tau_min, tau_max: the open range of τ (paper, GPT-2: 0.5 and 5.0).
        dropout: dropout on ``σ(W1 x)`` (paper: 0.5).

    Forward: ``(..., in_features)`` of any floating dtype → ``τ`` of shape ``(...)`` in the
    head's parameter dtype. The input is detached.
    """

    def __init__(self, in_features: int, *, width: int = 256, tau_min: float = 0.5, tau_max: float = 5.0,
                 dropout: float = 0.5) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        self.in_features, self.width = in_features, width
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.output = _PrototypeAttentionOutput(width, log_scale_init=0.0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.normalize(inputs.detach().to(self.fc1.weight.dtype), dim=-1)
        h = self.fc2(self.dropout(torch.sigmoid(self.fc1(x))))
        return bounded_temperature(self.output(h, h), self.tau_min, self.tau_max)

    def extra_repr(self) -> str:
        return f"tau_min={self.tau_min}, tau_max={self.tau_max}"


class ContrastiveTempNet(nn.Module):
    """TempNet for contrastive models: one temperature per image or text (SPEC §3).

    ``x = dropout(σ(P·sg(f)))``; ``q = x·ĉᵀ`` against ``M`` normalised learnable prototypes;
    ``a = softmax(q / exp(s))`` with ``s`` initialised to ``log 0.01``;
    ``o = w·((a − 1/M) ⊙ σ(q)) + b``; ``τ = τ_min + (τ_max − τ_min)·σ(o)``.

    Args:
        dim: the feature size ``D``.
        n_prototypes: ``M`` (paper: 256).
        tau_min, tau_max: the open range of τ (paper, CLIP: 0.005 and 0.05).
        dropout: dropout on ``σ(P f)``.

    Forward: ``(B, D)`` features → ``τ (B,)``. Call :meth:`init_prototypes_` with the first
    embeddings of the *other* modality before training, as the paper does.
    """

    def __init__(self, dim: int, *, n_prototypes: int = 256, tau_min: float = 0.005, tau_max: float = 0.05,
                 dropout: float = 0.0) -> None:
        super().__init__()
        _check_bounds(tau_min, tau_max)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.proj = nn.Linear(dim, dim)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim) / math.sqrt(dim))
        self.dropout = nn.Dropout(dropout)
        self.output = _PrototypeAttentionOutput(n_prototypes, log_scale_init=math.log(0.01))

    @torch.no_grad()
    def init_prototypes_(self, embeddings: torch.Tensor) -> None:
        """Copy the first ``M`` rows of ``embeddings (n, D)`` into the prototypes (the rest keep
        their random values when ``n < M``)."""
        count = min(embeddings.shape[0], self.prototypes.shape[0])
        self.prototypes[:count] = embeddings[:count].detach().to(self.prototypes.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.sigmoid(self.proj(features.detach().to(self.proj.weight.dtype))))
        scores = x @ F.normalize(self.prototypes, dim=-1).T
        return bounded_temperature(self.output(scores, torch.sigmoid(scores)), self.tau_min, self.tau_max)

    def extra_repr(self) -> str:
        return f"tau_min={self.tau_min}, tau_max={self.tau_max}"
