"""Retrieval metrics: pure functions over a ranked list of relevance flags (1 = relevant), no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Flags = Sequence[bool] | NDArray[np.bool_]


def average_precision(ranked: Flags, n_relevant: int) -> float:
    """Mean of the precision at each relevant position, over all ``n_relevant`` relevant items (missing ones count
    as precision 0, so a truncated ranking is penalised)."""
    r = np.asarray(ranked, dtype=bool)
    if n_relevant <= 0:
        return 0.0
    hits = np.flatnonzero(r)
    if hits.size == 0:
        return 0.0
    precision_at_hits = np.arange(1, hits.size + 1) / (hits + 1)
    return float(precision_at_hits.sum() / n_relevant)


def precision_at(ranked: Flags, k: int) -> float:
    """Share of relevant items among the first ``k`` (a ranking shorter than k counts its missing places as misses)."""
    r = np.asarray(ranked, dtype=bool)[:k]
    return float(r.sum() / k) if k > 0 else 0.0


def recall_at(ranked: Flags, k: int, n_relevant: int) -> float:
    """Share of all relevant items found among the first ``k``."""
    if n_relevant <= 0:
        return 0.0
    return float(np.asarray(ranked, dtype=bool)[:k].sum() / n_relevant)


def precision_recall_curve(ranked: Flags, n_relevant: int, points: int = 21) -> list[tuple[float, float]]:
    """Interpolated precision (the best precision at any recall >= r) at ``points`` recall levels 0..1."""
    r = np.asarray(ranked, dtype=bool)
    if n_relevant <= 0 or r.size == 0:
        return [(float(x), 0.0) for x in np.linspace(0, 1, points)]
    tp = np.cumsum(r)
    precision = tp / np.arange(1, r.size + 1)
    recall = tp / n_relevant
    best_after = np.maximum.accumulate(precision[::-1])[::-1]
    out = []
    for level in np.linspace(0, 1, points):
        idx = np.searchsorted(recall, level - 1e-12, side="left")
        out.append((float(level), float(best_after[idx]) if idx < r.size else 0.0))
    return out
