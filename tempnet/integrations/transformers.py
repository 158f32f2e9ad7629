"""TempNet for Hugging Face causal language models (transformers ≥ 5).

Three entry points:

- :class:`TempNetForCausalLM` wraps any ``AutoModelForCausalLM`` / ``PreTrainedModel`` and adds a
  :class:`tempnet.TempNet` head that predicts one temperature per token from ``sg(logits)`` (or
  ``sg(hidden states)``). Its loss is the tempered cross-entropy of SPEC §1 (DRO when ``rho`` is
  set) through :func:`tempnet.tempered_cross_entropy`, so the LM receives only ``∂L/∂z`` and the
  head only ``∂L/∂τ``. It trains with ``transformers.Trainer`` unchanged, saves next to the LM's
  own files (``tempnet.safetensors`` + ``tempnet_config.json``) and applies its temperatures in
  ``generate`` through :class:`TempNetLogitsProcessor`.
- :class:`TempNetLogitsProcessor` divides each generation step's scores by that step's τ.
- :func:`use_tempered_loss` switches an existing model's training loss to the fused tempered
  cross-entropy at a fixed temperature in one line (as Liger's ``apply_liger_kernel`` does).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from tempnet.functional import tempered_cross_entropy
from tempnet.heads import TempNet

TEMPNET_WEIGHTS_NAME = "tempnet.safetensors"
TEMPNET_CONFIG_NAME = "tempnet_config.json"
_SOURCES = ("logits", "hidden")


@dataclass
class TempNetConfig:
    """Hyper-parameters of the TempNet head and of its loss (SPEC §1, §3).

    Attributes:
        source: what the head reads, ``"logits"`` (the model's output logits, ``(…, V)``) or
            ``"hidden"`` (the input of the output embedding layer, ``(…, D)``). Always detached.
        width: the head's hidden width ``M``.
        tau_min, tau_max: the open range of the predicted temperatures (paper, LLaMA: 0.01 and 2.0,
            so that an untrained head starts near τ = 1).
        dropout: dropout inside the head (active in ``train()`` mode only).
        rho: the DRO radius ρ (paper: 8 for GPT-2's V = 50257); ``None`` trains with the plain
            tempered CE instead. Must be below ``log V``: ``KL(p ‖ uniform) ≤ log V``, so with
            ``ρ ≥ log V`` every τ pins at ``tau_min``.
        backend: the tempnet backend of the loss (``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``).
    """

    source: str = "logits"
    width: int = 256
    tau_min: float = 0.01
    tau_max: float = 2.0
    dropout: float = 0.5
    rho: float | None = 8.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES}, got {self.source!r}")
        if self.rho is not None and not math.isfinite(self.rho):
            raise ValueError(f"rho must be finite or None, got {self.rho}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TempNetConfig:
        """Build from a dict, ignoring unknown keys (forward compatibility of saved configs)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def check_rho(rho: float | None, vocab_size: int, argument: str = "rho") -> None:
    """Raise ``ValueError`` unless ``rho`` is ``None`` or below ``log(vocab_size)`` (SPEC §1).

    The τ-gradient of the DRO loss is ``H(p) − log V + ρ``; since ``H(p) ≥ 0`` it is positive for
    every token once ``ρ ≥ log V``, and every temperature is driven down to its lower bound.
    """
    if rho is None:
        return
    log_v = math.log(vocab_size)
    if rho >= log_v:
        raise ValueError(
            f"{argument}={rho} must be below log V = log({vocab_size}) = {log_v:.3f}: KL(p ‖ uniform) ≤ log V, "
            f"so with {argument} ≥ log V every temperature pins at tau_min. Pass {argument} < {log_v:.2f} "
            f"(e.g. {argument}={0.7 * log_v:.1f})"
        )


def shift_causal_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels ``(B, T)`` → next-token targets ``(B, T)``: position ``t`` predicts ``labels[t+1]``;
    the last position gets ``ignore_index`` (the convention of transformers' ``ForCausalLMLoss``)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def tempered_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int, num_items_in_batch: torch.Tensor | None = None,
    ignore_index: int = -100, shift_labels: torch.Tensor | None = None, *, tau: float | torch.Tensor = 1.0,
    rho: float | None = None, backend: str = "auto", **kwargs: Any,
) -> torch.Tensor:
    """Drop-in replacement of transformers' ``ForCausalLMLoss`` with the tempered CE of SPEC §1.

    Args:
        logits: ``(B, T, V)``, any floating dtype (the op accumulates in float32).
        labels: ``(B, T)`` int64, unshifted (``-100`` ignored); unused when ``shift_labels`` is given.
        vocab_size: ``V``.
        num_items_in_batch: when given (Trainer with gradient accumulation), the loss is the sum
            divided by it, as in transformers; otherwise the mean over non-ignored tokens.
        shift_labels: ``(B, T)`` already shifted targets.
        tau: a float or a ``(B, T)`` tensor, the temperature of the prediction made at each position.
        rho: ``None`` (plain tempered CE) or the DRO radius ρ.
        backend: the tempnet backend.
        kwargs: other keyword arguments transformers passes to loss functions (ignored).

    Returns:
        The float32 scalar loss (the logits' dtype for float64).
    """
    if shift_labels is None:
        shift_labels = shift_causal_labels(labels, ignore_index)
    shift_labels = shift_labels.to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = tempered_cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1),
                                  tau.reshape(-1) if torch.is_tensor(tau) and tau.dim() > 0 else tau,
                                  rho=rho, ignore_index=ignore_index, reduction=reduction, backend=backend)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def use_tempered_loss(model: PreTrainedModel, *, tau: float = 1.0, rho: float | None = None,
                      backend: str = "auto") -> PreTrainedModel:
    """Switch ``model``'s training loss to the fused tempered cross-entropy, in place.

    Sets ``model.loss_function`` (the hook every transformers ≥ 5 causal LM calls when given
    ``labels``) to :func:`tempered_causal_lm_loss` with a fixed temperature ``tau`` (and DRO radius
    ``rho``). With ``tau=1.0, rho=None`` the loss equals the model's own cross-entropy; the fused
    backends compute it without the float32 copy of the logits transformers makes. Returns ``model``.
    """
    if not (isinstance(tau, float | int) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
    model.loss_function = functools.partial(tempered_causal_lm_loss, tau=float(tau), rho=rho, backend=backend)
    return model


@dataclass
class TempNetCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``temperatures``: the ``(B, T)`` float32 τ of each position."""

    temperatures: torch.Tensor | None = None


class _HeadInputCapture:
    """Records what TempNet reads on every forward pass of the wrapped LM while active.

    ``source="logits"``: the ``logits`` of the LM's output (after any final softcap);
    ``source="hidden"``: the input of its output embedding layer. ``value`` is ``(B, T, ·)``.
    """

    def __init__(self, model: PreTrainedModel, source: str) -> None:
        self.model, self.source = model, source
        self.value: torch.Tensor | None = None
        self._handle = None

    def _record_logits(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.value = output.logits if hasattr(output, "logits") else output[0]

    def _record_hidden(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = args[0]

    def __enter__(self) -> _HeadInputCapture:
        if self.source == "logits":
            self._handle = self.model.register_forward_hook(self._record_logits)
        else:
            self._handle = self.model.get_output_embeddings().register_forward_hook(self._record_hidden)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.value = None


class TempNetLogitsProcessor(LogitsProcessor):
    """Divides each generation step's scores by the TempNet temperature of that step.

    τ is computed from the wrapped LM's *raw* output of the step (its logits for
    ``source="logits"``, its last hidden state for ``source="hidden"``), recorded by a forward
    hook, so greedy search, sampling and beam search all use the same τ. The division applies to
    the scores the processor receives: raw logits in greedy search and sampling (so sampling draws
    from ``softmax(z/τ)``), log-probabilities in beam search (as transformers' own ``temperature``
    does there). Greedy search is unchanged by a positive scale; sampling and beam scores are not.

    Use it through :meth:`TempNetForCausalLM.generate`, which activates it; ``temperatures`` then
    holds one ``(rows,)`` float32 tensor per generated step (rows = batch × beams).
    """

    def __init__(self, model: TempNetForCausalLM) -> None:
        self.tempnet = model.tempnet
        self._capture = _HeadInputCapture(model.model, model.tempnet_config.source)
        self.temperatures: list[torch.Tensor] = []

    def __enter__(self) -> TempNetLogitsProcessor:
        self._capture.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._capture.__exit__(*exc)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._capture.value is None:
            raise RuntimeError("TempNetLogitsProcessor is inactive: generate through TempNetForCausalLM.generate, "
                               "or enter the processor (`with processor:`) around model.generate")
        step_input = self._capture.value[:, -1]
        if step_input.shape[0] != scores.shape[0]:
            raise RuntimeError(f"TempNetLogitsProcessor: the last forward pass had {step_input.shape[0]} rows but the "
                               f"scores have {scores.shape[0]}")
        with torch.no_grad():
            tau = self.tempnet(step_input).to(device=scores.device, dtype=torch.float32)
        self.temperatures.append(tau)
        return scores / tau[:, None].to(scores.dtype)


class TempNetForCausalLM(nn.Module):
    """A causal LM with a TempNet head predicting a temperature per token (SPEC §1, §3).

    Args:
        model: any transformers causal LM (``AutoModelForCausalLM``).
        config: the head and loss settings (:class:`TempNetConfig`); defaults if ``None``.
        train_model: ``True`` trains the LM and TempNet jointly; ``False`` freezes the LM
            (``requires_grad=False``, forward without autograd) and learns TempNet only.

    ``forward(input_ids, attention_mask, labels, ...)`` returns a :class:`TempNetCausalLMOutput`
    with ``logits`` (the LM's own, untempered), ``temperatures (B, T)`` and, given ``labels``, the
    tempered loss: the mean over non-ignored shifted labels (or the sum over
    ``num_items_in_batch``), exactly like the LM's own loss. The head reads a detached input, and
    the loss op gives the LM only ``∂L/∂z`` and the head only ``∂L/∂τ``.

    Attributes the wrapper does not define (``config``, ``device``, ``generation_config``,
    ``get_input_embeddings`` …) are those of the wrapped LM.

    Saving: :meth:`save_pretrained` writes the LM's usual files (loadable alone by
    ``AutoModelForCausalLM``) plus ``tempnet.safetensors`` and ``tempnet_config.json``;
    :meth:`from_pretrained` reads both. ``Trainer`` checkpoints hold the wrapper's ``state_dict``
    (``model.*`` and ``tempnet.*`` keys), which ``resume_from_checkpoint`` restores; export the
    final model with ``save_pretrained``.
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch; the loss handles it as transformers does

    def __init__(self, model: PreTrainedModel, config: TempNetConfig | None = None, *,
                 train_model: bool = True) -> None:
        super().__init__()
        config = config if config is not None else TempNetConfig()
        output_weight = model.get_output_embeddings().weight
        vocab_size, hidden_size = output_weight.shape
        check_rho(config.rho, vocab_size)
        self.model = model
        self.tempnet_config = config
        self.train_model = train_model
        self.tempnet = TempNet(vocab_size if config.source == "logits" else hidden_size, width=config.width,
                               tau_min=config.tau_min, tau_max=config.tau_max, dropout=config.dropout)
        self.tempnet.to(output_weight.device)
        if not train_model:
            model.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, num_items_in_batch: torch.Tensor | None = None,
                **kwargs: Any) -> TempNetCausalLMOutput:
        """Run the LM, predict ``τ (B, T)`` and, given ``labels (B, T)``, the tempered loss.

        Other keyword arguments (``position_ids``, ``cache``, ``inputs_embeds`` …) go to the LM.
        """
        with _HeadInputCapture(self.model, self.tempnet_config.source) as capture, \
                torch.set_grad_enabled(torch.is_grad_enabled() and self.train_model):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            head_input = capture.value
        temperatures = self.tempnet(head_input)
        loss = None
        if labels is not None:
            loss = tempered_causal_lm_loss(outputs.logits, labels, outputs.logits.shape[-1], num_items_in_batch,
                                           tau=temperatures, rho=self.tempnet_config.rho,
                                           backend=self.tempnet_config.backend)
        return TempNetCausalLMOutput(loss=loss, logits=outputs.logits, cache=getattr(outputs, "cache", None),
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                     temperatures=temperatures)

    def generate(self, *args: Any, use_tempnet: bool = True, logits_processor: LogitsProcessorList | None = None,
                 **kwargs: Any) -> Any:
        """``model.generate`` with each step's scores divided by its TempNet temperature.

        Takes every argument of transformers' ``generate``. ``use_tempnet=False`` generates with
        the LM alone. Call ``eval()`` first so the head's dropout is off.
        """
        processors = LogitsProcessorList(logits_processor or [])
        if not use_tempnet:
            return self.model.generate(*args, logits_processor=processors, **kwargs)
        with TempNetLogitsProcessor(self) as processor:
            processors.append(processor)
            return self.model.generate(*args, logits_processor=processors, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the LM (``model.save_pretrained(save_directory, **kwargs)``) and the TempNet head."""
        self.model.save_pretrained(save_directory, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.tempnet.state_dict().items()}
        save_file(state, os.path.join(save_directory, TEMPNET_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, TEMPNET_CONFIG_NAME), "w") as handle:
            json.dump(asdict(self.tempnet_config), handle, indent=2)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, train_model: bool = True,
                        **kwargs: Any) -> TempNetForCausalLM:
        """Load a directory (or Hub repository) written by :meth:`save_pretrained`.

        ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``torch_dtype``, ``device_map`` …).
        """
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
        with open(cached_file(pretrained_model_name_or_path, TEMPNET_CONFIG_NAME)) as handle:
            config = TempNetConfig.from_dict(json.load(handle))
        wrapper = cls(model, config, train_model=train_model)
        state = load_file(cached_file(pretrained_model_name_or_path, TEMPNET_WEIGHTS_NAME))
        wrapper.tempnet.load_state_dict(state)
        return wrapper
