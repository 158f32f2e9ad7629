"""The demo's two training runs on the same batches and seed, and their evaluation.

- baseline: a Llama-style LM trained with its own cross-entropy (τ = 1);
- TempNet: the same LM (same initial weights) wrapped in
  :class:`~tempnet.integrations.transformers.TempNetForCausalLM` and trained jointly with its
  TempNet head on the DRO loss of SPEC §1 (the LM gets ``∂L/∂z``, the head ``∂L/∂τ``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from tempnet.functional import tempered_cross_entropy
from tempnet.integrations.transformers import TempNetConfig, TempNetForCausalLM


@dataclass
class DemoSettings:
    """Every knob of the demo; the defaults are the ones chosen in docs/TUNING.md."""

    steps: int = 300
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    tempnet_lr: float = 1e-2
    rho: float = 3.5
    tau_min: float = 0.01
    tau_max: float = 2.0
    tempnet_width: int = 256
    tempnet_dropout: float = 0.5
    backend: str = "auto"
    max_eval_tokens: int = 32768
    log_every: int = 5


@dataclass
class RunResult:
    """One trained model, its training curve ``[(step, CE at τ = 1)]`` and wall time in seconds."""

    model: torch.nn.Module
    curve: list[tuple[int, float]]
    tau_curve: list[tuple[int, float]]
    seconds: float


def batch_starts(settings: DemoSettings, n_train: int) -> np.ndarray:
    """``(steps, batch)`` random window starts in the training stream, fixed by the seed."""
    rng = np.random.default_rng(settings.seed)
    return rng.integers(0, n_train - settings.seq_len, size=(settings.steps, settings.batch_size))


def build_lm(settings: DemoSettings, eos_id: int) -> LlamaForCausalLM:
    """A freshly initialised Llama from a LlamaConfig (no download), seeded by ``settings.seed``."""
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=settings.seq_len, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(settings.device)


def _schedule(settings: DemoSettings):
    """Linear warm-up then cosine decay to 10 % of the peak learning rate."""
    warmup = max(1, int(settings.warmup_fraction * settings.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(settings: DemoSettings, train_ids: np.ndarray, eos_id: int, *, with_tempnet: bool,
          show_progress: bool = True) -> RunResult:
    """Train the baseline (``with_tempnet=False``) or the TempNet + DRO model for ``settings.steps``."""
    started = time.perf_counter()
    lm = build_lm(settings, eos_id)
    groups = [{"params": list(lm.parameters()), "lr": settings.lr, "weight_decay": 0.1}]
    model: torch.nn.Module = lm
    if with_tempnet:
        config = TempNetConfig(source="logits", width=settings.tempnet_width, tau_min=settings.tau_min,
                               tau_max=settings.tau_max, dropout=settings.tempnet_dropout, rho=settings.rho,
                               backend=settings.backend)
        model = TempNetForCausalLM(lm, config)
        groups.append({"params": list(model.tempnet.parameters()), "lr": settings.tempnet_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    tokens = torch.from_numpy(train_ids)
    offsets = torch.arange(settings.seq_len)
    curve, tau_curve = [], []
    model.train()
    label = "TempNet+DRO" if with_tempnet else "baseline   "
    progress = tqdm(batch_starts(settings, len(train_ids)), desc=label, disable=not show_progress, leave=True)
    for step, starts in enumerate(progress):
        batch = tokens[torch.from_numpy(starts)[:, None] + offsets].to(settings.device)
        output = model(input_ids=batch, labels=batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            with torch.no_grad():
                ce = F.cross_entropy(output.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()).item()
            curve.append((step, ce))
            postfix = {"ce": f"{ce:.3f}"}
            if with_tempnet:
                tau_mean = output.temperatures.mean().item()
                tau_curve.append((step, tau_mean))
                postfix["tau"] = f"{tau_mean:.3f}"
            progress.set_postfix(postfix)
    return RunResult(model.eval(), curve, tau_curve, time.perf_counter() - started)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_ids: np.ndarray, settings: DemoSettings) -> dict[str, np.ndarray]:
    """Per-token validation quantities over non-overlapping windows of ``seq_len`` tokens.

    Returns float64 arrays: ``nll`` (CE of the model's own logits, τ = 1), ``entropy`` (of
    ``softmax(z)``) and, for a TempNet model, ``tau`` and ``nll_tau`` (plain CE of ``z / τ``).
    """
    model.eval()
    n_windows = max(1, min(len(val_ids), settings.max_eval_tokens) // settings.seq_len)
    windows = torch.from_numpy(val_ids[: n_windows * settings.seq_len].reshape(n_windows, settings.seq_len))
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "entropy": [], "tau": [], "nll_tau": []}
    for batch in windows.split(32):
        batch = batch.to(settings.device)
        output = model(input_ids=batch)
        logits = output.logits[:, :-1].flatten(0, 1).float()
        target = batch[:, 1:].flatten()
        log_p = torch.log_softmax(logits, dim=-1)
        parts["nll"].append(-log_p.gather(1, target[:, None]).squeeze(1))
        parts["entropy"].append(-(log_p.exp() * log_p).sum(-1))
        if getattr(output, "temperatures", None) is not None:
            tau = output.temperatures[:, :-1].flatten()
            parts["tau"].append(tau)
            parts["nll_tau"].append(tempered_cross_entropy(logits, target, tau, reduction="none",
                                                           backend=settings.backend))
    return {key: torch.cat(values).double().cpu().numpy() for key, values in parts.items() if values}
