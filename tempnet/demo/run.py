"""The ``tempnet demo`` command: options, knob validation and the end-to-end run."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from tempnet.demo.corpus import load_text, split_text
from tempnet.demo.metrics import distribution, pearson, spearman
from tempnet.demo.report import summary, write_json, write_plot
from tempnet.demo.tokenizer import encode, train_tokenizer
from tempnet.demo.training import DemoSettings, evaluate, train
from tempnet.dispatch import BACKENDS
from tempnet.integrations.transformers import check_rho

REPORT_JSON, REPORT_PNG, MODEL_DIR = "demo_report.json", "demo_report.png", "model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the demo's options on ``parser`` (defaults from :class:`DemoSettings`)."""
    d = DemoSettings()
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text file to train on (default: Python's bundled docs, pydoc_data.topics)")
    parser.add_argument("--out", type=Path, default=Path("tempnet_demo"),
                        help="output directory (default: %(default)s)")
    parser.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps per run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of both runs (default: %(default)s)")
    method = parser.add_argument_group("TempNet / DRO")
    method.add_argument("--rho", type=float, default=d.rho, help="DRO radius ρ, below log V (default: %(default)s)")
    method.add_argument("--tau-min", type=float, default=d.tau_min, help="lower bound of τ (default: %(default)s)")
    method.add_argument("--tau-max", type=float, default=d.tau_max, help="upper bound of τ (default: %(default)s)")
    method.add_argument("--tempnet-lr", type=float, default=d.tempnet_lr,
                        help="learning rate of the TempNet head (default: %(default)s)")
    method.add_argument("--tempnet-width", type=int, default=d.tempnet_width,
                        help="hidden width M of the head (default: %(default)s)")
    method.add_argument("--backend", default=d.backend, choices=BACKENDS,
                        help="tempnet backend of the loss (default: %(default)s)")
    model = parser.add_argument_group("model and data")
    model.add_argument("--lr", type=float, default=d.lr, help="learning rate of the LM (default: %(default)s)")
    model.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    model.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default: %(default)s)")
    model.add_argument("--vocab-size", type=int, default=d.vocab_size,
                       help="BPE vocabulary size V (default: %(default)s)")
    model.add_argument("--hidden-size", type=int, default=d.hidden_size, help="model width (default: %(default)s)")
    model.add_argument("--layers", type=int, default=d.layers, help="transformer layers (default: %(default)s)")
    model.add_argument("--heads", type=int, default=d.heads, help="attention heads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Validated :class:`DemoSettings` from parsed options; ``ValueError`` names the bad option."""
    names = {f.name for f in fields(DemoSettings)}
    settings = DemoSettings(**{key: value for key, value in vars(args).items() if key in names})
    positive = {"--steps": settings.steps, "--lr": settings.lr, "--tempnet-lr": settings.tempnet_lr,
                "--batch-size": settings.batch_size, "--seq-len": settings.seq_len - 1,
                "--hidden-size": settings.hidden_size, "--layers": settings.layers, "--heads": settings.heads}
    for option, value in positive.items():
        if not value > 0:
            raise ValueError(f"{option} must be positive ({'> 1' if option == '--seq-len' else '> 0'}), got {value}")
    if settings.hidden_size % settings.heads:
        raise ValueError(f"--hidden-size ({settings.hidden_size}) must be a multiple of --heads ({settings.heads})")
    if settings.vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + <|endoftext|>), got {settings.vocab_size}")
    if not (0 < settings.tau_min < settings.tau_max and math.isfinite(settings.tau_max)):
        raise ValueError(f"need 0 < --tau-min < --tau-max, got --tau-min {settings.tau_min} "
                         f"--tau-max {settings.tau_max}")
    if not settings.tau_min < 1 < settings.tau_max:
        raise ValueError(f"--tau-min {settings.tau_min} and --tau-max {settings.tau_max} must bracket 1, so that "
                         f"the model's own logits (τ = 1) are a possible temperature")
    check_rho(settings.rho, settings.vocab_size, "--rho")
    return settings


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo end to end; write ``demo_report.json``, ``demo_report.png`` and the TempNet
    model (with its tokenizer) under ``args.out``; print a summary; return the report."""
    started = time.perf_counter()
    settings = settings_from_args(args)
    show_progress = not getattr(args, "no_progress", False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    text, source = load_text(args.text)
    train_text, val_text = split_text(text)
    tokenizer = train_tokenizer(train_text, settings.vocab_size)
    settings.vocab_size = len(tokenizer)
    check_rho(settings.rho, settings.vocab_size, "--rho")
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    if len(train_ids) <= settings.seq_len or len(val_ids) < settings.seq_len:
        raise ValueError(f"--text is too short: {len(train_ids)} training and {len(val_ids)} validation tokens, "
                         f"need more than --seq-len ({settings.seq_len}) of each; pass a longer file or lower "
                         f"--seq-len")

    baseline = train(settings, train_ids, tokenizer.eos_token_id, with_tempnet=False, show_progress=show_progress)
    tempnet = train(settings, train_ids, tokenizer.eos_token_id, with_tempnet=True, show_progress=show_progress)
    base_tokens = evaluate(baseline.model, val_ids, settings)
    temp_tokens = evaluate(tempnet.model, val_ids, settings)

    model_dir = out / MODEL_DIR
    tempnet.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    report = {
        "settings": asdict(settings),
        "corpus": {"source": source, "characters": len(text), "train_tokens": len(train_ids),
                   "val_tokens": len(val_ids), "eval_tokens": len(base_tokens["nll"]), "vocab_size": len(tokenizer)},
        "baseline": {"val_loss": float(base_tokens["nll"].mean()), "val_ppl": float(np.exp(base_tokens["nll"].mean())),
                     "train_curve": baseline.curve, "seconds": baseline.seconds},
        "tempnet": {"val_loss_tau1": float(temp_tokens["nll"].mean()),
                    "val_ppl_tau1": float(np.exp(temp_tokens["nll"].mean())),
                    "val_loss_tempnet": float(temp_tokens["nll_tau"].mean()),
                    "val_ppl_tempnet": float(np.exp(temp_tokens["nll_tau"].mean())),
                    "train_curve": tempnet.curve, "tau_curve": tempnet.tau_curve, "seconds": tempnet.seconds},
        "tau": distribution(temp_tokens["tau"]),
        "correlation": {"with": "predictive entropy H(softmax(z)) of the TempNet model's own logits",
                        "spearman": spearman(temp_tokens["tau"], temp_tokens["entropy"]),
                        "pearson": pearson(temp_tokens["tau"], temp_tokens["entropy"])},
        "device": str(torch.device(settings.device)), "torch_threads": torch.get_num_threads(),
        "paths": {"json": str(out / REPORT_JSON), "png": str(out / REPORT_PNG), "model": str(model_dir)},
    }
    report["wall_seconds"] = time.perf_counter() - started
    write_plot(report, temp_tokens, out / REPORT_PNG)
    write_json(report, out / REPORT_JSON)
    print(summary(report))
    print(f"report: {out / REPORT_JSON}, plot: {out / REPORT_PNG}, model: {model_dir} "
          f"(try: tempnet generate --model {model_dir})")
    return report
