"""tempnet: fused softmax losses with per-sample temperatures, and TempNet (Qiu et al., ICML 2024).

Public ops (SPEC §1, §2): :func:`tempered_cross_entropy`, :func:`tempered_linear_cross_entropy`,
:func:`tempered_contrastive_loss`; their module forms; backend selection in
:mod:`tempnet.dispatch`.
"""

from tempnet._validation import set_value_checks, value_checks
from tempnet.dispatch import BackendUnavailableError, choose_backend
from tempnet.functional import tempered_contrastive_loss, tempered_cross_entropy, tempered_linear_cross_entropy
from tempnet.global_contrastive import GlobalContrastiveLoss
from tempnet.heads import ContrastiveTempNet, TempNet
from tempnet.losses import TemperedContrastiveLoss, TemperedCrossEntropyLoss, TemperedLinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ContrastiveTempNet",
    "GlobalContrastiveLoss",
    "TempNet",
    "TemperedContrastiveLoss",
    "TemperedCrossEntropyLoss",
    "TemperedLinearCrossEntropyLoss",
    "choose_backend",
    "set_value_checks",
    "tempered_contrastive_loss",
    "tempered_cross_entropy",
    "tempered_linear_cross_entropy",
    "value_checks",
]
