"""Pure, vectorised similarity functions: no I/O, numpy in, numpy out.

Every distance takes one query ``q`` of shape ``(d,)`` and a matrix ``X`` of shape ``(n, d)`` and returns ``(n,)``.
Histograms are expected L1-normalised (an all-zero histogram is allowed and handled). Hashes are packed ``uint64``
words, shape ``(w,)`` for the query and ``(n, w)`` for the collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
Floats = NDArray[np.floating]


def _rows(X: NDArray) -> NDArray:
    return X.reshape(1, -1) if X.ndim == 1 else X


# --- embeddings ---------------------------------------------------------------------------------------------------


def l2_normalize(X: Floats, eps: float = 1e-12) -> Floats:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / np.maximum(norms, eps)


def cosine_similarity(q: Floats, X: Floats) -> F32:
    """Cosine similarity in [-1, 1]; a zero vector has similarity 0 to everything."""
    return (l2_normalize(_rows(X)) @ l2_normalize(q.reshape(-1))).astype(np.float32)


def euclidean_distance(q: Floats, X: Floats) -> F32:
    diff = _rows(X).astype(np.float32) - q.reshape(1, -1).astype(np.float32)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff)).astype(np.float32)


def manhattan_distance(q: Floats, X: Floats) -> F32:
    return np.abs(_rows(X).astype(np.float32) - q.reshape(1, -1).astype(np.float32)).sum(axis=1).astype(np.float32)


def fit_whitening(X: Floats, dims: int, power: float = 0.25, eps: float = 1e-6) -> tuple[F32, F32]:
    """PCA-whitening of the rows of ``X``: ``(mean, projection)`` with ``projection`` of shape ``(d, dims)``.

    Each principal axis is scaled by ``eigenvalue ** -power`` (0.5 is full whitening; smaller powers only damp the
    dominant directions, which suits retrieval better, as in Jégou and Chum's "negative evidences").
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    w, V = np.linalg.eigh(np.cov((X - mean).T))
    top = np.argsort(-w)[: min(dims, X.shape[1])]
    return mean.astype(np.float32), (V[:, top] / (np.maximum(w[top], 0.0) + eps) ** power).astype(np.float32)


def apply_whitening(X: Floats, mean: Floats, projection: Floats) -> F32:
    """Rows of ``X`` (or one vector) projected by ``fit_whitening``'s result and L2-normalised."""
    Y = (np.asarray(X, dtype=np.float32) - mean) @ projection
    return l2_normalize(Y).astype(np.float32)


def augment(X: Floats, neighbours: NDArray[np.integer]) -> F32:
    """Database-side augmentation: each row replaced by the weighted sum of its ``k`` nearest rows, re-normalised.

    ``neighbours[i]`` lists row i's nearest rows best first (itself first); the weights fall linearly from 1 to
    ``1/k``, so each image moves towards its neighbourhood without losing itself.
    """
    X = np.asarray(X, dtype=np.float32)
    k = neighbours.shape[1]
    w = np.linspace(1.0, 0.0, k + 1, dtype=np.float32)[:k]
    return l2_normalize(np.einsum("k,nkd->nd", w, X[neighbours])).astype(np.float32)


def expand_query(q: Floats, neighbours: Floats, similarities: Floats, alpha: float = 3.0) -> F32:
    """Alpha query expansion: ``q`` plus its nearest vectors weighted by ``similarity ** alpha``, re-normalised."""
    w = np.clip(np.asarray(similarities, dtype=np.float32), 0.0, None) ** np.float32(alpha)
    out = np.asarray(q, dtype=np.float32).reshape(-1) + w @ _rows(np.asarray(neighbours, dtype=np.float32))
    return l2_normalize(out).astype(np.float32)


# --- histograms -----------------------------------------------------------------------------------------------------


def normalize_histogram(h: Floats) -> F32:
    """L1-normalise the last axis; an all-zero histogram stays all-zero."""
    h = np.clip(np.asarray(h, dtype=np.float32), 0, None)
    total = h.sum(axis=-1, keepdims=True)
    return np.divide(h, total, out=np.zeros_like(h), where=total > 0)


def chi2_distance(q: Floats, X: Floats) -> F32:
    """Symmetric chi-square, 0.5 * sum((a-b)^2 / (a+b)), in [0, 1] for normalised histograms (0/0 counts 0)."""
    X = _rows(X).astype(np.float32)
    q = q.reshape(1, -1).astype(np.float32)
    num = (X - q) ** 2
    den = X + q
    chi2 = 0.5 * np.divide(num, den, out=np.zeros_like(num), where=den > 0).sum(axis=1)
    return np.clip(chi2, 0.0, 1.0).astype(np.float32)  # float32 rounding can exceed 1 for disjoint histograms


def hellinger_distance(q: Floats, X: Floats) -> F32:
    """Hellinger distance sqrt(1 - sum(sqrt(a*b))) in [0, 1]; equals ||sqrt(a) - sqrt(b)||_2 / sqrt(2).

    Computed in the second form: the first takes the square root of a difference of two numbers close to 1, so in
    float32 identical histograms came out about 3e-4 apart and near duplicates were off by up to ~1e-5.
    """
    diff = np.sqrt(_rows(X).astype(np.float32)) - np.sqrt(q.reshape(1, -1).astype(np.float32))
    return np.clip(np.sqrt(0.5 * np.einsum("ij,ij->i", diff, diff)), 0.0, 1.0).astype(np.float32)


def intersection_distance(q: Floats, X: Floats) -> F32:
    """1 - histogram intersection (sum of bin-wise minima), in [0, 1]."""
    inter = np.minimum(_rows(X).astype(np.float32), q.reshape(1, -1).astype(np.float32)).sum(axis=1)
    return np.clip(1.0 - inter, 0.0, 1.0).astype(np.float32)


def emd_distance(q: Floats, X: Floats, bins: tuple[int, int, int] = (8, 4, 4)) -> F32:
    """Earth mover's distance on the three channel marginals of an (hue, sat, value) histogram, in [0, 1].

    Each marginal's 1-D EMD is exact: sum |CDF_a - CDF_b| for saturation and value, and for the circular hue
    sum |F_i - median(F)| (the optimal circular transport). Each is divided by its largest possible value and the
    three are averaged.
    """
    X3 = _rows(X).astype(np.float64).reshape(-1, *bins)
    q3 = q.reshape(1, *bins).astype(np.float64)
    nh, ns, nv = bins
    out = np.zeros(X3.shape[0], dtype=np.float64)
    for axis, n, circular in ((1, nh, True), (2, ns, False), (3, nv, False)):
        others = tuple(a for a in (1, 2, 3) if a != axis)
        diff = np.cumsum(X3.sum(axis=others) - q3.sum(axis=others), axis=1)
        if circular:
            cost = np.abs(diff - np.median(diff, axis=1, keepdims=True)).sum(axis=1) / (n / 2)
        else:
            cost = np.abs(diff[:, :-1]).sum(axis=1) / max(n - 1, 1)
        out += cost
    return np.clip(out / 3.0, 0.0, 1.0).astype(np.float32)


HISTOGRAM_DISTANCES = {
    "hellinger": hellinger_distance,
    "chi2": chi2_distance,
    "intersection": intersection_distance,
    "emd": emd_distance,
}

# --- hashes ---------------------------------------------------------------------------------------------------------


def hamming_distance(q: NDArray[np.uint64], X: NDArray[np.uint64]) -> NDArray[np.int32]:
    """Number of differing bits between packed uint64 hashes: a vectorised popcount over every row of X."""
    X = np.asarray(X, dtype=np.uint64)  # no copy of a memory-mapped matrix; one word (column) at a time
    X = X.reshape(X.shape[0], -1) if X.ndim > 1 else X.reshape(-1, 1)
    q = np.asarray(q, dtype=np.uint64).reshape(-1)
    out = np.bitwise_count(X[:, 0] ^ q[0]).astype(np.int32)
    for j in range(1, X.shape[1]):
        out += np.bitwise_count(X[:, j] ^ q[j])
    return out


# --- scores, fusion, aggregation --------------------------------------------------------------------------------------


def to_similarity(measure: str, distance: str, values: Floats, *, dim: int = 1) -> F32:
    """Map a measure's raw output to a similarity in [0, 1] (1 = identical)."""
    v = np.asarray(values, dtype=np.float32)
    if measure == "embedding" or distance == "layout":  # layout: the cosine of two colour layout vectors
        if distance in ("cosine", "layout"):
            sim = v
        elif distance == "euclidean":  # unit vectors: d in [0, 2]
            sim = 1.0 - v / 2.0
        else:  # manhattan on unit vectors: d in [0, 2*sqrt(dim)]
            sim = 1.0 - v / (2.0 * np.sqrt(dim))
    elif measure == "hash":  # Hamming distance over `dim` bits
        sim = 1.0 - v / float(dim)
    else:  # every histogram distance is already in [0, 1]
        sim = 1.0 - v
    return np.clip(sim, 0.0, 1.0).astype(np.float32)


def normalize_to_baseline(sim: Floats, baseline: float) -> F32:
    """Rescale a similarity so that a random pair of the collection scores 0 and an identical pair scores 1."""
    b = float(min(max(baseline, 0.0), 0.999))
    return np.clip((np.asarray(sim, dtype=np.float32) - b) / (1.0 - b), 0.0, 1.0).astype(np.float32)


def fuse(scores: Mapping[str, Floats], weights: Mapping[str, float]) -> F32:
    """Weighted mean of already-normalised per-measure scores; measures without a score are left out."""
    used = [m for m in scores if weights.get(m, 0.0) > 0]
    if not used:
        raise ValueError("mix needs at least one measure with a positive weight")
    total = sum(weights[m] for m in used)
    return (sum(weights[m] * np.asarray(scores[m], dtype=np.float32) for m in used) / total).astype(np.float32)


FUSIONS = ("weighted", "adaptive", "rrf", "gated")  # gated: weighted, colour's weight scaled by colour_gate


def colour_agreement(emb_of_colour_top: Floats, emb_of_emb_top: Floats) -> float:
    """How much the colour measure agrees with the content on this collection, in [0, 1]: over sampled images, the
    mean (baseline-normalised) embedding similarity of each image's colour nearest, divided by that of its
    embedding nearest (rows: sampled images, columns: their k nearest). 1: colour finds what the embedding finds
    (colour is part of what the photos are about); near 0: colour neighbours are unrelated in content."""
    num = np.asarray(emb_of_colour_top, dtype=np.float64).mean(axis=1)
    den = np.asarray(emb_of_emb_top, dtype=np.float64).mean(axis=1)
    return float(np.clip(num / np.maximum(den, 1e-6), 0.0, 1.0).mean()) if num.size else 0.0


GATE_RAMP = 0.05  # colour_gate: from 0 to its full weight over this much agreement above the floor


def colour_gate(agreement: float, floor: float, ramp: float = GATE_RAMP) -> float:
    """The share of its weight colour keeps in the mix: 0 up to ``floor`` agreement, all of it from ``floor +
    ramp``. Colour helps the mix only where it agrees with the content, and then about equally much (measured:
    docs/relevance.md); where it does not (cats vs dogs: every colour in both classes) it is kept out, so the mix
    is the embedding's ranking there."""
    return float(np.clip((agreement - floor) / max(ramp, 1e-6), 0.0, 1.0))
ADAPTIVE_TOP, ADAPTIVE_REST = 5, (50, 100)  # adaptive: the mean of the best 5 against ranks 50 to 100
RRF_K = 60


def separation(S: Floats) -> F32:
    """How clearly each row's best scores stand out: the mean of its ``ADAPTIVE_TOP`` best minus the mean of its
    ranks ``ADAPTIVE_REST`` (fewer columns: its lower half), at least 0. A measure that ranks a few images far
    above the rest for this query is trusted more (the query-adaptive weights of ``fuse_scores``)."""
    S = np.atleast_2d(np.asarray(S, dtype=np.float32))
    n = S.shape[1]
    if n < 2:
        return np.zeros(S.shape[0], np.float32)
    lo, hi = ADAPTIVE_REST if n > ADAPTIVE_REST[1] else (n // 2, n)
    top = -np.sort(-S, axis=1)[:, :hi]
    return np.clip(top[:, : min(ADAPTIVE_TOP, lo or 1)].mean(axis=1) - top[:, lo:hi].mean(axis=1), 0.0, None
                   ).astype(np.float32)


def fuse_scores(scores: Mapping[str, Floats], weights: Mapping[str, float], method: str = "weighted") -> F32:
    """Fuse already-normalised per-measure scores (each ``(queries, candidates)``, or one row) into one score.

    ``weighted``: their weighted mean (``fuse``). ``adaptive``: per query row, the weights of the embedding and the
    colour scaled by how clearly that measure separates its best candidates (``separation``). ``rrf``: reciprocal
    rank fusion, ``sum w / (RRF_K + rank)``, rescaled so that first under every measure scores 1. Under every
    method the hash counts as near-duplicate evidence added by its weight, so a copy stays first.
    """
    if method in ("weighted", "gated"):  # gated: the caller has scaled colour's weight (colour_gate)
        return fuse(scores, weights)
    used = [m for m in scores if weights.get(m, 0.0) > 0]
    if not used:
        raise ValueError("mix needs at least one measure with a positive weight")
    rows = {m: np.atleast_2d(np.asarray(scores[m], dtype=np.float32)) for m in used}
    graded = [m for m in used if m != "hash"]
    if method == "adaptive":
        w = {m: weights[m] * separation(rows[m])[:, None] for m in graded}
        total = sum(w.values()) + sum(weights[m] for m in used if m == "hash")
        total = np.where(np.asarray(total) > 0, total, 1.0)
        out = sum(w[m] * rows[m] for m in graded) + sum(weights[m] * rows[m] for m in used if m == "hash")
        out = out / total
    elif method == "rrf":
        fused = np.zeros_like(rows[used[0]])
        for m in graded:
            rank = np.argsort(np.argsort(-rows[m], axis=1, kind="stable"), axis=1)
            fused += weights[m] * (RRF_K + 1.0) / (RRF_K + 1.0 + rank)
        total = sum(weights[m] for m in graded) or 1.0
        out = fused / total + sum(weights[m] * rows[m] for m in used if m == "hash")
    else:
        raise ValueError(f"unknown fusion {method!r}: use {', '.join(FUSIONS)}")
    out = np.asarray(out, dtype=np.float32)
    return out.reshape(np.shape(scores[used[0]])) if np.ndim(scores[used[0]]) < 2 else out


def soft_min(S: Floats, tau: float = 0.05, axis: int = 0) -> F32:
    """Soft minimum over query images: -tau * log(mean(exp(-s / tau))).

    With tau -> 0 it is the minimum (an image must match every query), with tau -> inf the mean. A small tau lets a
    candidate that is close to all queries beat one that is very close to one query and far from the others.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.shape[axis] == 1:
        return np.squeeze(S, axis=axis).astype(np.float32)
    if tau <= 0:
        return S.min(axis=axis).astype(np.float32)
    m = S.min(axis=axis, keepdims=True)
    out = m - tau * np.log(np.mean(np.exp(-(S - m) / tau), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis).astype(np.float32)


def aggregate(S: Floats, how: str = "softmin", tau: float = 0.05) -> F32:
    """Combine per-query scores (queries x candidates) into one score per candidate."""
    if how == "softmin":
        return soft_min(S, tau)
    if how == "min":
        return np.asarray(S, dtype=np.float32).min(axis=0)
    if how == "mean":
        return np.asarray(S, dtype=np.float32).mean(axis=0)
    raise ValueError(f"unknown aggregation {how!r}: use softmin, min or mean")


def penalize(score: Floats, negative: Floats, weight: float = 0.5) -> F32:
    """Push down candidates that resemble a negative example ("less like this"): ``score - weight * max_neg``.

    ``negative`` holds the candidates' similarities to each negative image (negatives x candidates), on the same
    scale as ``score``; with no negative image the score is returned unchanged.
    """
    s = np.asarray(score, dtype=np.float32)
    neg = np.asarray(negative, dtype=np.float32)
    if neg.size == 0:
        return s
    return (s - np.float32(weight) * neg.max(axis=0)).astype(np.float32)


def ranks_within(scores: Floats, positions: Sequence[int] | NDArray[np.integer]) -> NDArray[np.int64]:
    """1-based rank of ``scores[p]`` among all ``scores`` (ties share the better rank) for each position ``p``."""
    s = np.asarray(scores, dtype=np.float32)
    if s.size == 0:
        return np.empty(0, np.int64)
    ordered = np.sort(s)[::-1]
    picked = s[np.asarray(positions, dtype=np.int64)]
    return (np.searchsorted(-ordered, -picked, side="left") + 1).astype(np.int64)
