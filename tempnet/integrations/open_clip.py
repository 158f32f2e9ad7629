"""A drop-in replacement for open_clip's ``ClipLoss`` with TempNet temperatures (SPEC §2, §2b, §3).

:class:`TempNetClipLoss` keeps ``ClipLoss``'s constructor options and calling convention,
``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``, and
returns the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``. Inside, it uses the
fused contrastive op of :mod:`tempnet` with one temperature per image and per text.

Temperatures (``temperature=``):

- ``"tempnet"`` (default): two :class:`tempnet.heads.ContrastiveTempNet` heads, owned by the
  module, predict ``τ_image (B,)`` and ``τ_text (B,)`` from the detached features; the model's
  ``logit_scale`` is ignored (freeze it, ``model.logit_scale.requires_grad_(False)``, so that
  DDP sees no unused parameter). Give ``loss.parameters()`` their own optimizer param group
  (paper lr ≈ 3e-5). On the first call the prototypes of each head are initialised from the
  first ``M`` embeddings of the *other* modality (SPEC §3) unless :meth:`init_prototypes_` ran before.
- ``"logit_scale"``: the baseline, ``τ = 1 / logit_scale`` for every sample (differentiable, so
  the model's learnable scale trains as with ``ClipLoss``). With ``rho=None`` this equals ``ClipLoss``.

Estimators (``estimator=``):

- ``"minibatch"``: :func:`tempnet.tempered_contrastive_loss` with ``rho`` (``None`` for
  InfoNCE, a float for the DRO loss of SPEC §2).
- ``"global"``: :class:`tempnet.global_contrastive.GlobalContrastiveLoss` (SPEC §2b), a moving
  average of each sample's inner mean over all negatives; needs the dataset index of every pair,
  passed as ``loss(..., indices=idx)`` with ``idx (B,)`` int64.

``logit_bias`` (SigLIP-style models) adds the same constant to every logit, which a softmax
ignores, so it is accepted and has no effect, as in ``ClipLoss``.

Distributed (``world_size > 1``, a ``torch.distributed`` process group already set up):

- ``local_loss=True, gather_with_grad=True``: local anchors against the all-gathered batch,
  with gradient through the gather (:func:`tempnet.distributed.distributed_tempered_contrastive_loss`).
- ``local_loss=False``: every rank computes the loss of the whole gathered batch, as ``ClipLoss``
  does; with ``gather_with_grad=False`` only the local slice carries gradient.
- ``local_loss=True, gather_with_grad=False`` is refused: open_clip then drops the gradient of
  every candidate, which the fused op does not reproduce.
- ``estimator="global"`` needs ``local_loss=True``; its moving-average state is updated with the
  indices of every rank and stays identical across ranks.

The heads live in this module, not in the DDP-wrapped model, so after ``backward()`` call
:meth:`TempNetClipLoss.average_head_gradients_` on every rank before ``optimizer.step()``.
Horovod is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tempnet.distributed import all_gather_no_grad, all_gather_with_grad, distributed_tempered_contrastive_loss
from tempnet.functional import tempered_contrastive_loss
from tempnet.global_contrastive import GlobalContrastiveLoss
from tempnet.heads import ContrastiveTempNet

TEMPERATURES = ("tempnet", "logit_scale")
ESTIMATORS = ("minibatch", "global")


def _gather_rows(rows: torch.Tensor, *, with_grad: bool, rank: int, world_size: int) -> torch.Tensor:
    """All-gather ``rows (b, ...)`` into ``(world_size·b, ...)`` in rank order.

    ``with_grad``: the gradient flows back to every rank's slice; otherwise only the local slice
    (index ``rank``) is differentiable, as in open_clip's ``gather_features``.
    """
    if with_grad:
        return all_gather_with_grad(rows)
    parts = list(all_gather_no_grad(rows).chunk(world_size, dim=0))
    parts[rank] = rows
    return torch.cat(parts, dim=0)


class TempNetClipLoss(nn.Module):
    """open_clip ``ClipLoss`` with per-sample temperatures from TempNet (see the module docstring).

    Args:
        embed_dim: ``D``, the size of the model's output embeddings; required for ``"tempnet"``.
        temperature: ``"tempnet"`` or ``"logit_scale"`` (baseline ``τ = 1/logit_scale``).
        rho: DRO radius ρ (SPEC §2); ``None`` gives InfoNCE. Keep ρ below ``log(B − 1)``, the
            largest KL from uniform over ``B − 1`` negatives, or every τ is pushed to ``tau_min``.
        estimator: ``"minibatch"`` or ``"global"`` (SPEC §2b, needs ``rho`` and ``indices``).
        dataset_size: number of pairs in the dataset (``"global"`` only; ``None`` grows on demand).
        gamma: moving-average rate γ of the global estimator (paper: 0.8).
        n_prototypes, tau_min, tau_max, dropout: the heads' options (paper, CLIP: 256, 0.005, 0.05).
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as in
            ``open_clip.loss.ClipLoss``. ``cache_labels`` has no effect (no label tensor is built).
        backend: tempnet backend, ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Forward: features ``(B, D)`` (normalised, as open_clip returns them), ``logit_scale`` a 0-d
    or ``(1,)`` tensor → scalar loss in float32 (float64 for float64 features).
    """

    def __init__(
        self, embed_dim: int | None = None, *, temperature: str = "tempnet", rho: float | None = 7.0,
        estimator: str = "minibatch", dataset_size: int | None = None, gamma: float = 0.8,
        n_prototypes: int = 256, tau_min: float = 0.005, tau_max: float = 0.05, dropout: float = 0.0,
        local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0,
        world_size: int = 1, use_horovod: bool = False, backend: str = "auto",
    ) -> None:
        super().__init__()
        if temperature not in TEMPERATURES:
            raise ValueError(f"temperature must be one of {TEMPERATURES}, got {temperature!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by TempNetClipLoss; use torch.distributed "
                             "(torchrun) with world_size > 1 instead")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError("local_loss=True needs gather_with_grad=True in TempNetClipLoss: without it open_clip "
                             "drops the gradient of every candidate feature; pass gather_with_grad=True")
        if estimator == "global":
            if rho is None:
                raise ValueError("estimator='global' is the DRO loss of SPEC §2b and needs rho (a float)")
            if world_size > 1 and not local_loss:
                raise ValueError("estimator='global' with world_size > 1 scores local anchors against the gathered "
                                 "batch; pass local_loss=True, gather_with_grad=True")
        if temperature == "tempnet" and embed_dim is None:
            raise ValueError("temperature='tempnet' needs embed_dim, the size of the model's embeddings")
        self.temperature, self.rho, self.estimator, self.backend = temperature, rho, estimator, backend
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.image_tempnet: ContrastiveTempNet | None = None
        self.text_tempnet: ContrastiveTempNet | None = None
        if temperature == "tempnet":
            head_options = {"n_prototypes": n_prototypes, "tau_min": tau_min, "tau_max": tau_max, "dropout": dropout}
            self.image_tempnet = ContrastiveTempNet(embed_dim, **head_options)
            self.text_tempnet = ContrastiveTempNet(embed_dim, **head_options)
        # The buffer saves the flag in checkpoints; the Python mirror avoids a device sync per step.
        self.register_buffer("prototypes_initialized", torch.tensor(temperature != "tempnet"))
        self._prototypes_ready = temperature != "tempnet"
        self.global_loss: GlobalContrastiveLoss | None = None
        if estimator == "global":
            self.global_loss = GlobalContrastiveLoss(dataset_size, gamma=gamma, rho=rho, backend=backend,
                                                     distributed=world_size > 1)

    @torch.no_grad()
    def init_prototypes_(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """Initialise the image head's prototypes from ``text_features (n, D)`` and the text head's
        from ``image_features (n, D)``: the first ``M`` rows of the other modality (SPEC §3)."""
        if self.image_tempnet is None or self.text_tempnet is None:
            raise ValueError("init_prototypes_ needs temperature='tempnet' (this loss has no TempNet heads)")
        self.image_tempnet.init_prototypes_(text_features)
        self.text_tempnet.init_prototypes_(image_features)
        self.prototypes_initialized.fill_(True)
        self._prototypes_ready = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prototypes_ready = bool(self.prototypes_initialized)

    def temperatures(self, image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(τ_image (B,), τ_text (B,))`` for features ``(B, D)``, float32.

        ``"tempnet"``: the heads' predictions (differentiable w.r.t. the heads only).
        ``"logit_scale"``: ``1 / logit_scale`` repeated (differentiable w.r.t. ``logit_scale``).
        """
        batch = image_features.shape[0]
        if self.image_tempnet is None or self.text_tempnet is None:
            if logit_scale is None:
                raise ValueError("temperature='logit_scale' needs logit_scale")
            scale = torch.as_tensor(logit_scale, device=image_features.device).reshape(())
            tau = (1.0 / scale.float()).expand(batch)
            return tau, tau
        return self.image_tempnet(image_features).float(), self.text_tempnet(text_features).float()

    def average_head_gradients_(self) -> None:
        """Average the heads' gradients over the process group (call after ``backward()`` when
        ``world_size > 1``; a no-op otherwise), so every rank applies the same update."""
        if self.world_size <= 1:
            return
        for param in self.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(self.world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor | float | None = None, logit_bias: torch.Tensor | None = None,
                output_dict: bool = False, *, indices: torch.Tensor | None = None,
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The contrastive loss of a batch of pairs (see the class docstring for shapes).

        ``indices (B,)`` int64: dataset index of every pair, required by ``estimator="global"``
        and ignored otherwise. ``logit_bias`` has no effect (see the module docstring).
        """
        if not self._prototypes_ready:
            self._init_prototypes_from_batch(image_features, text_features)
        tau_image, tau_text = self.temperatures(image_features, text_features, logit_scale)
        loss = self._contrastive(image_features, text_features, tau_image, tau_text, indices)
        return {"contrastive_loss": loss} if output_dict else loss

    def _init_prototypes_from_batch(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """First-call initialisation; in distributed runs from the gathered batch, so all ranks agree."""
        if self.world_size > 1:
            image_features, text_features = all_gather_no_grad(image_features), all_gather_no_grad(text_features)
        self.init_prototypes_(image_features, text_features)

    def _contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor, tau_image: torch.Tensor,
                     tau_text: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if self.global_loss is not None:
            if indices is None:
                raise ValueError("estimator='global' needs the dataset index of every pair: loss(..., indices=idx) "
                                 "with idx (B,) int64")
            return self.global_loss(image_features, text_features, tau_image, tau_text, indices)
        if self.world_size > 1 and self.local_loss:
            return distributed_tempered_contrastive_loss(image_features, text_features, tau_image, tau_text,
                                                         rho=self.rho, backend=self.backend)
        if self.world_size > 1:
            gather = {"with_grad": self.gather_with_grad, "rank": self.rank, "world_size": self.world_size}
            image_features, text_features, tau_image, tau_text = (
                _gather_rows(rows, **gather) for rows in (image_features, text_features, tau_image, tau_text))
        return tempered_contrastive_loss(image_features, text_features, tau_image, tau_text, rho=self.rho,
                                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature!r}, estimator={self.estimator!r}, rho={self.rho}, "
                f"world_size={self.world_size}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}")
