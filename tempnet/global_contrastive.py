"""Global contrastive loss with a moving-average estimator of the inner mean (SogCLR / iSogCLR, SPEC §2b).

The DRO loss of SPEC §2 averages ``exp((s_ij − s_ii)/τ_i)`` over the negatives of a batch; over a
whole dataset that mean is tracked per sample across steps. With ``L_i`` the minibatch DRO loss
of anchor ``i`` (any backend's fused ``contrastive_side``), the batch estimate is
``log g_i = L_i / τ_i − ρ`` and the state update is ``log u ← logaddexp(log(1−γ) + log u, log γ + log g)``
(``u ← g`` on a first visit).

Gradient (SPEC §2b). With ``r_i = g_i / u_i`` and ``e_i = log u_i + ρ − r_i (log g_i + ρ)``, both
constants, the surrogate ``r_i L_i + e_i τ_i`` has ``∂/∂s_ij = r_i ∂L_i/∂s_ij =
exp((s_ij − s_ii)/τ_i) / ((B−1) u_i)`` and, since ``∂L_i/∂τ_i = log g_i + ρ − Σ_j w_ij (s_ij−s_ii)/τ_i``,
``∂/∂τ_i = log u_i + ρ − Σ_j exp((s_ij−s_ii)/τ_i)(s_ij−s_ii)/τ_i / ((B−1) u_i)``: exactly the
estimator. The returned value is ``τ_i log u_i + ρ τ_i`` averaged (the SPEC value) with the
surrogate's gradient attached. With ``γ = 1``, ``u = g``, ``r = 1``, ``e = 0``: the minibatch loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tempnet._validation import check_finite_scalar, check_value, prepare_contrastive
from tempnet.dispatch import BACKENDS, choose_backend
from tempnet.distributed import all_gather_no_grad, check_equal_local_batches, gather_features, world_and_rank

_STATE = ("log_u_image", "log_u_text", "seen")


class GlobalContrastiveLoss(nn.Module):
    """Stateful DRO contrastive loss over a dataset (SPEC §2b); ``forward(...)`` returns a scalar.

    Args:
        dataset_size: number of samples ``N`` (indices in ``[0, N)``). ``None`` grows the state on
            demand, which reads the largest index on the host (a synchronisation on a GPU).
        gamma: moving-average rate ``γ ∈ (0, 1]``; ``1`` is the minibatch loss (paper: 0.8).
        rho: the DRO ρ (finite).
        backend: backend of the per-anchor losses, as in :func:`tempnet.tempered_contrastive_loss`.
        distributed: ``None`` (default) uses ``torch.distributed`` when a process group of more
            than one rank is initialised; ``False`` keeps every rank on its own batch.
        group: the process group (default: the world).

    State (buffers, in ``state_dict``): ``log_u_image`` and ``log_u_text`` ``(N,)`` (the dtype of
    the module, float32 unless ``.double()`` is called; keep it out of ``.half()`` / ``.bfloat16()``
    casts of an enclosing model) and ``seen`` ``(N,)`` bool. Move the module to the features'
    device with ``.to(device)``.

    Distributed (each rank holds ``b`` pairs of the global batch, the same ``b`` everywhere, and
    ``indices`` from a distributed sampler): features are all-gathered with gradient, each rank
    scores its local anchors against the global batch (:mod:`tempnet.distributed`), and the
    indices and ``log g`` of every rank are all-gathered so that every rank applies the same
    update to the full state, which stays identical across ranks. The returned value is the mean
    over the local anchors; its gradients follow the convention of
    :func:`tempnet.distributed.distributed_tempered_contrastive_loss`.
    """

    log_u_image: torch.Tensor
    log_u_text: torch.Tensor
    seen: torch.Tensor

    def __init__(self, dataset_size: int | None = None, *, gamma: float, rho: float, backend: str = "auto",
                 distributed: bool | None = None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if dataset_size is not None and (
            isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1
        ):
            raise ValueError(f"dataset_size must be a positive int or None, got {dataset_size!r}")
        check_finite_scalar(gamma, "gamma")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if rho is None:
            raise ValueError("rho must be a float (the DRO radius), got None")
        check_finite_scalar(rho, "rho")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dataset_size, self.gamma, self.rho, self.backend = dataset_size, float(gamma), float(rho), backend
        self.distributed, self.group = distributed, group
        size = dataset_size or 0
        self.register_buffer("log_u_image", torch.zeros(size))
        self.register_buffer("log_u_text", torch.zeros(size))
        self.register_buffer("seen", torch.zeros(size, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"dataset_size={self.dataset_size}, gamma={self.gamma}, rho={self.rho}, backend={self.backend!r}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A growing state may be saved at any size: resize the buffers before loading it.
        if self.dataset_size is None:
            for name in _STATE:
                incoming = state_dict.get(prefix + name)
                buffer = getattr(self, name)
                if isinstance(incoming, torch.Tensor) and incoming.shape != buffer.shape:
                    setattr(self, name, buffer.new_zeros(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _is_distributed(self) -> bool:
        if self.distributed is False:
            return False
        world, _ = world_and_rank(self.group)
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True but torch.distributed is not initialised; call init_process_group")
        return world > 1

    def _check_indices(self, indices: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor of dataset indices, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must hold integer dataset indices (int64), got {indices.dtype}")
        if indices.shape != (batch,):
            raise ValueError(f"indices must have shape ({batch},) (one dataset index per pair), "
                             f"got {tuple(indices.shape)}")
        if indices.device != device:
            raise ValueError(f"indices is on {indices.device} but the features are on {device}; move it")
        indices = indices.long()
        upper = f"[0, {self.dataset_size})" if self.dataset_size is not None else "[0, inf)"
        in_range = indices >= 0
        if self.dataset_size is not None:
            in_range &= indices < self.dataset_size
        check_value(in_range, f"indices has values outside {upper}")
        return indices

    def _grow(self, indices: torch.Tensor) -> None:
        """Make the state (grown by ``dataset_size=None``) cover ``indices``; host synchronisation."""
        needed = int(indices.max()) + 1
        if needed <= self.seen.shape[0]:
            return
        for name in _STATE:
            old = getattr(self, name)
            new = old.new_zeros(max(needed, 2 * old.shape[0]))
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def _update(self, name: str, indices: torch.Tensor, log_g: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Moving-average update of ``log_u`` at ``indices`` (SPEC §2b); returns the new ``log u``."""
        state = getattr(self, name)
        log_keep = math.log1p(-self.gamma) if self.gamma < 1.0 else -math.inf
        old = state[indices].to(log_g.dtype)
        new = torch.where(seen, torch.logaddexp(old + log_keep, log_g + math.log(self.gamma)), log_g)
        state[indices] = new.to(state.dtype)
        return new

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, tau_image: float | torch.Tensor,
                tau_text: float | torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Loss of a batch of pairs with dataset indices.

        Args:
            image_features, text_features: ``(b, D)``, row ``i`` of each a positive pair.
            tau_image, tau_text: float or ``(b,)`` temperatures (> 0) of the image / text anchors.
            indices: ``(b,)`` integer dataset indices of the pairs, distinct within the global batch.

        Returns:
            A 0-d tensor (float32, float64 for float64 features): the SPEC §2b value, with the
            estimator's gradient w.r.t. both features and both temperatures.
        """
        distributed = self._is_distributed()
        world, rank = world_and_rank(self.group) if distributed else (1, 0)
        batch = image_features.shape[0] if isinstance(image_features, torch.Tensor) and image_features.dim() == 2 else 0
        tau_i, tau_t = prepare_contrastive(image_features, text_features, tau_image, tau_text, rho=self.rho,
                                           reduction="mean", n_candidates=world * batch)
        device = image_features.device
        indices = self._check_indices(indices, batch, device)
        if self.seen.device != device:
            if self.seen.numel():
                raise ValueError(f"the state of GlobalContrastiveLoss is on {self.seen.device} but the features "
                                 f"are on {device}; call loss_module.to({device})")
            self.to(device)
        if distributed:
            check_equal_local_batches(batch, device, self.group)
            all_image, all_text, _, _ = gather_features(image_features, text_features, group=self.group)
            all_indices = all_gather_no_grad(indices, self.group)
        else:
            all_image, all_text, all_indices = image_features, text_features, indices
        if all_indices.device.type == "cpu" and torch.unique(all_indices).numel() != all_indices.numel():
            raise ValueError("indices must be distinct within the (global) batch; got repeated dataset indices")
        if self.dataset_size is None:
            self._grow(all_indices)

        module = choose_backend(self.backend, device).module
        offset = rank * batch
        sides = []
        for name, anchors, candidates, tau in (("log_u_image", image_features, all_text, tau_i),
                                               ("log_u_text", text_features, all_image, tau_t)):
            losses = module.contrastive_side(anchors, candidates, tau, offset=offset, rho=self.rho)
            tau_c = tau.detach().to(losses.dtype)
            log_g = losses.detach() / tau_c - self.rho
            all_log_g = all_gather_no_grad(log_g, self.group) if distributed else log_g
            seen = self.seen[all_indices]
            log_u = self._update(name, all_indices, all_log_g, seen)[offset:offset + batch]
            ratio = torch.exp(log_g - log_u)
            shift = log_u + self.rho - ratio * (log_g + self.rho)
            value = (tau_c * (log_u + self.rho)).mean()
            surrogate = (ratio * losses + shift * tau).mean()
            sides.append((value, surrogate))
        self.seen[all_indices] = True
        value = 0.5 * (sides[0][0] + sides[1][0])
        surrogate = 0.5 * (sides[0][1] + sides[1][1])
        return value + (surrogate - surrogate.detach())
