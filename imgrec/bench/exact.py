"""Exact search by brute force (numpy) over the vectors the index stores, scored with the engine's distances: the
baseline each search-stage figure is compared with (what the search would cost without an index).

Its distances and its mix are the engine's (``imgrec.measures``: each measure's default distance, the mix's
normalisation, weights and fusion); the ground truth of recall is the engine's own exhaustive search
(``imgrec.bench.search.Exhaustive``), so a change of the engine's scoring cannot skew recall, only this baseline's
ranking (its timing does not depend on the constants)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim


class Exact:
    """Every image of an ``IndexSet`` scored against the query images, with the engine's default distances, mix
    normalisation and weights, and soft minimum over query images.

    The matrices are read once from the index (``IndexSet.embeddings``, ``.color``, ``.hashes``: whatever space and
    dimension the index holds) into memory as float32: the fastest brute force numpy offers, so the speed-up of the
    index is not flattered.
    """

    def __init__(self, idx: Any, config: Any) -> None:
        from imgrec import measures

        t0 = time.perf_counter()
        self.idx = idx
        self.mix = measures.mix(idx, config)  # the engine's mix of the measures at their default distances
        self.distances = {m: part.distance for m, part in measures.singles(idx, config).items()}
        self.ids = np.asarray(idx.ids, dtype=np.int64)
        self.rows_of: Callable[[Sequence[int]], NDArray[np.int64]] = idx.rows
        self.E = sim.l2_normalize(np.asarray(idx.embeddings, dtype=np.float32))
        self.R = np.sqrt(np.asarray(idx.color, dtype=np.float32))  # Hellinger = L2 between square roots / sqrt(2)
        self.r2 = np.einsum("ij,ij->i", self.R, self.R)
        self.H = np.ascontiguousarray(idx.hashes, dtype=np.uint64)
        layout = idx.layout if self.distances["color"] == "layout" else None
        self.L = None if layout is None else sim.l2_normalize(np.asarray(layout, dtype=np.float32))
        self.tau = config.softmin_tau
        self.load_ms = round((time.perf_counter() - t0) * 1000.0, 1)

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def similarities(self, measure: str, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        """(query images, N) similarities in [0, 1] under one single measure."""
        if measure == "embedding":
            return sim.to_similarity("embedding", "cosine", self.E[rows] @ self.E.T)
        if measure == "color" and self.L is not None:
            return sim.to_similarity("color", "layout", self.L[rows] @ self.L.T)
        if measure == "color":
            d2 = self.r2[rows, None] + self.r2[None, :] - 2.0 * (self.R[rows] @ self.R.T)
            return sim.to_similarity("color", "hellinger", np.sqrt(np.clip(0.5 * d2, 0.0, 1.0)))
        if measure == "hash":
            return np.stack([sim.to_similarity("hash", "phash+dhash", sim.hamming_distance(self.H[r], self.H),
                                               dim=64 * self.H.shape[1]) for r in rows])
        raise ValueError(f"no exact search for {measure!r}")

    def scores(self, measure: str, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        """(N,) the score of every image for the query images together (as Engine.search ranks them)."""
        if measure == "mix":
            per_image, _ = self.mix.fuse(self.idx, {m: self.similarities(m, rows) for m in self.mix.parts})
        else:
            per_image = self.similarities(measure, rows)
        return sim.aggregate(per_image, "softmin", self.tau)

    def search(self, measure: str, query_ids: Sequence[int], k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The exact top ``k`` ids (query images excluded) and every image's score (query images at -inf)."""
        rows = self.rows_of(list(query_ids))
        s = self.scores(measure, rows).astype(np.float32, copy=True)
        s[rows] = -np.inf
        k = min(k, s.size - len(set(rows.tolist())))
        top = np.argpartition(-s, k - 1)[:k] if k > 0 else np.empty(0, np.int64)
        top = top[np.argsort(-s[top], kind="stable")]
        return self.ids[top], s


def recall_at_k(found: Sequence[int], exact_scores: NDArray[np.float32], ids: NDArray[np.int64],
                rows_of: Callable[[Sequence[int]], NDArray[np.int64]], k: int, eps: float = 1e-4) -> float:
    """Share of the exact top ``k`` that the search returned, ties counted: a returned image scoring at least the
    exact k-th best score (less ``eps``, float rounding) is one of the top k."""
    finite = exact_scores[np.isfinite(exact_scores)]
    want = min(k, finite.size)
    if want == 0:
        return 1.0
    kth = np.partition(finite, finite.size - want)[finite.size - want]
    found = list(found)[:k]
    if not found:
        return 0.0
    got = exact_scores[rows_of(found)]
    return float(min(int(np.sum(got >= kth - eps)), want) / want)
