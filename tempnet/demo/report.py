"""The demo's report: a JSON file, a matplotlib PNG and a printed summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_json(report: dict, path: Path) -> None:
    """Write ``report`` as indented JSON."""
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(report: dict, per_token: dict[str, np.ndarray], path: Path) -> None:
    """Four panels: training CE of both runs, validation perplexities, the histogram of the
    predicted τ, and τ against the model's predictive entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    curves = axes[0, 0]
    for name, label in (("baseline", "baseline (CE, τ = 1)"), ("tempnet", "TempNet + DRO (CE at τ = 1)")):
        steps, values = zip(*report[name]["train_curve"], strict=True)
        curves.plot(steps, values, label=label)
    curves.set(xlabel="step", ylabel="training cross-entropy (nats)", title="Training")
    curves.legend()

    bars = axes[0, 1]
    labels = ["baseline\nτ = 1", "TempNet\nτ = 1", "TempNet\npredicted τ"]
    values = [report["baseline"]["val_ppl"], report["tempnet"]["val_ppl_tau1"], report["tempnet"]["val_ppl_tempnet"]]
    bars.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green"])
    for index, value in enumerate(values):
        bars.text(index, value, f"{value:.2f}", ha="center", va="bottom")
    bars.set(ylabel="validation perplexity", title="Validation perplexity")

    tau = report["tau"]
    histogram = axes[1, 0]
    edges = np.asarray(tau["histogram"]["edges"])
    histogram.bar(edges[:-1], tau["histogram"]["counts"], width=np.diff(edges), align="edge")
    histogram.set(xlabel="predicted τ", ylabel="tokens",
                  title=f"Predicted τ (median {tau['quantiles']['0.5']:.3f}, std {tau['std']:.3f})")

    scatter = axes[1, 1]
    scatter.hexbin(per_token["entropy"], per_token["tau"], gridsize=40, bins="log", mincnt=1)
    correlation = report["correlation"]
    scatter.set(xlabel="predictive entropy H(softmax(z)) (nats)", ylabel="predicted τ",
                title=f"τ vs entropy: Spearman {correlation['spearman']:.2f}, Pearson {correlation['pearson']:.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(report: dict) -> str:
    """A few human-readable lines with the headline numbers of ``report``."""
    base, temp, tau, corr = report["baseline"], report["tempnet"], report["tau"], report["correlation"]
    q = tau["quantiles"]
    return "\n".join([
        f"corpus: {report['corpus']['source']} ({report['corpus']['train_tokens']} train / "
        f"{report['corpus']['val_tokens']} validation tokens, V = {report['corpus']['vocab_size']})",
        f"validation perplexity  baseline (τ = 1): {base['val_ppl']:.3f}",
        f"                       TempNet  (τ = 1): {temp['val_ppl_tau1']:.3f}",
        f"                       TempNet  (τ̂):     {temp['val_ppl_tempnet']:.3f}",
        f"predicted τ: mean {tau['mean']:.3f}, std {tau['std']:.3f}, 5/50/95 % quantiles "
        f"{q['0.05']:.3f} / {q['0.5']:.3f} / {q['0.95']:.3f}",
        f"τ vs predictive entropy: Spearman {corr['spearman']:+.3f}, Pearson {corr['pearson']:+.3f}",
        f"training time: baseline {base['seconds']:.1f} s, TempNet {temp['seconds']:.1f} s; "
        f"total {report['wall_seconds']:.1f} s",
    ])
