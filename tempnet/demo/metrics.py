"""Summary statistics of the demo: quantiles, histograms and rank / linear correlations."""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays (0.0 when either is constant)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends - 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = average[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def distribution(values: np.ndarray, bins: int = 40) -> dict:
    """Mean, std, min, max, the :data:`QUANTILES` and a ``bins``-bin histogram of ``values``."""
    values = np.asarray(values, np.float64)
    counts, edges = np.histogram(values, bins=bins)
    return {
        "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
