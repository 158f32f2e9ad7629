"""The sweep behind the demo's TempNet defaults (docs/TUNING.md).

Trains the demo's baseline once per seed and TempNet + DRO for every ``(ρ, TempNet lr)`` pair and
seed, all with the demo's other defaults, in worker processes of one thread each; writes every
run's numbers and the mean ± std per configuration to JSON and prints a Markdown table.

    python -m tempnet.demo.sweep --out benchmarks/results/tuning_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from tempnet.demo.corpus import load_text, split_text
from tempnet.demo.metrics import pearson, spearman
from tempnet.demo.tokenizer import encode, train_tokenizer
from tempnet.demo.training import DemoSettings, evaluate, train


def _run(settings: DemoSettings, train_ids: np.ndarray, val_ids: np.ndarray, eos_id: int, with_tempnet: bool) -> dict:
    torch.set_num_threads(1)
    result = train(settings, train_ids, eos_id, with_tempnet=with_tempnet, show_progress=False)
    tokens = evaluate(result.model, val_ids, settings)
    row = {"seed": settings.seed, "seconds": result.seconds, "val_ppl_tau1": float(np.exp(tokens["nll"].mean()))}
    if with_tempnet:
        row.update(rho=settings.rho, tempnet_lr=settings.tempnet_lr,
                   val_ppl_tempnet=float(np.exp(tokens["nll_tau"].mean())),
                   tau_mean=float(tokens["tau"].mean()), tau_std=float(tokens["tau"].std()),
                   tau_p05=float(np.quantile(tokens["tau"], 0.05)), tau_p95=float(np.quantile(tokens["tau"], 0.95)),
                   spearman=spearman(tokens["tau"], tokens["entropy"]),
                   pearson=pearson(tokens["tau"], tokens["entropy"]))
    return row


def _mean_std(rows: list[dict], key: str) -> list[float]:
    values = np.array([row[key] for row in rows])
    return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]


def summarise(baselines: list[dict], tempnets: list[dict]) -> list[dict]:
    """Mean and std over seeds of every configuration (the baseline first)."""
    table = [{"config": "baseline (CE, τ = 1)", "val_ppl_tau1": _mean_std(baselines, "val_ppl_tau1")}]
    for key in sorted({(row["rho"], row["tempnet_lr"]) for row in tempnets}):
        rows = [row for row in tempnets if (row["rho"], row["tempnet_lr"]) == key]
        entry = {"config": f"TempNet ρ = {key[0]:g}, lr = {key[1]:g}", "rho": key[0], "tempnet_lr": key[1]}
        for metric in ("val_ppl_tau1", "val_ppl_tempnet", "tau_mean", "tau_std", "tau_p05", "tau_p95", "spearman",
                       "pearson"):
            entry[metric] = _mean_std(rows, metric)
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    """The summary as a Markdown table (mean ± std over seeds)."""
    def cell(entry: dict, key: str, digits: int = 2) -> str:
        return f"{entry[key][0]:.{digits}f} ± {entry[key][1]:.{digits}f}" if key in entry else "—"

    lines = ["| configuration | val ppl, τ = 1 | val ppl, predicted τ | τ mean | τ std | τ 5–95 % | "
             "Spearman(τ, H) | Pearson(τ, H) |", "|---|---|---|---|---|---|---|---|"]
    for entry in table:
        spread = f"{entry['tau_p05'][0]:.2f}–{entry['tau_p95'][0]:.2f}" if "tau_p05" in entry else "—"
        lines.append(f"| {entry['config']} | {cell(entry, 'val_ppl_tau1')} | {cell(entry, 'val_ppl_tempnet')} | "
                     f"{cell(entry, 'tau_mean', 3)} | {cell(entry, 'tau_std', 3)} | {spread} | "
                     f"{cell(entry, 'spearman')} | {cell(entry, 'pearson')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep; write the JSON to ``--out``; print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rho", type=float, nargs="+", default=[3.0, 3.5])
    parser.add_argument("--tempnet-lr", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=DemoSettings().steps)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning_sweep.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = DemoSettings(steps=args.steps)
    train_text, val_text = split_text(load_text()[0])
    tokenizer = train_tokenizer(train_text, base.vocab_size)
    train_ids, val_ids, eos_id = encode(tokenizer, train_text), encode(tokenizer, val_text), tokenizer.eos_token_id
    jobs = [(replace(base, seed=seed), False) for seed in args.seeds]
    jobs += [(replace(base, seed=seed, rho=rho, tempnet_lr=lr), True)
             for rho, lr, seed in itertools.product(args.rho, args.tempnet_lr, args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_run, settings, train_ids, val_ids, eos_id, flag) for settings, flag in jobs]
        rows = [future.result() for future in futures]
    baselines = rows[: len(args.seeds)]
    tempnets = rows[len(args.seeds):]
    table = summarise(baselines, tempnets)
    result = {"settings": asdict(base), "seeds": args.seeds, "baseline_runs": baselines, "tempnet_runs": tempnets,
              "summary": table, "wall_seconds": time.perf_counter() - started, "threads_per_run": 1,
              "workers": args.workers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(table))
    print(f"wall time {result['wall_seconds']:.0f} s; written {args.out}")
    return result


if __name__ == "__main__":
    main()
