"""Options shared by every backend of the cross-entropy ops (SPEC §1, §1b).

The public functions validate their arguments once and hand the backends a frozen
:class:`CEOptions`; backends never re-validate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CEOptions:
    """Per-call options of ``tempered_cross_entropy`` / ``tempered_linear_cross_entropy``.

    Attributes:
        rho: ``None`` for plain tempered CE, else the DRO radius ρ (SPEC §1).
        ignore_index: target value marking an ignored row.
        softcap: ``None`` or ``c > 0``; logits become ``c·tanh(z/c)`` first (SPEC §1b).
        label_smoothing: ε in ``[0, 1)``.
        class_weight: ``None`` or a ``(V,)`` floating tensor of class weights.
        z_loss: λ ≥ 0; adds ``λ·lse(u)²`` per non-ignored row.
        inplace_backward: allow a backend to overwrite the logits buffer with ∂L/∂z
            (the caller promises not to read the logits afterwards).
    """

    rho: float | None = None
    ignore_index: int = -100
    softcap: float | None = None
    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None
    z_loss: float = 0.0
    inplace_backward: bool = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
