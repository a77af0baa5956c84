"""The embedding measure: the model's vectors in the index's space (whitened where the lake is large enough),
compared by cosine (or Euclidean / Manhattan distance between the unit vectors)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.measures.base import Measure, QueryFeatures, Rows

if TYPE_CHECKING:
    from imgrec.index import IndexSet

_BLOCK = 65536  # rows read at a time from the memory-mapped matrix


class Embedding(Measure):
    family = "embedding"
    distances = ("cosine", "euclidean", "manhattan")
    feature = "emb"
    graph = "embedding"
    needs_model = True
    expandable = True

    @classmethod
    def stored(cls, idx: IndexSet, row: int) -> NDArray[np.float32]:
        return np.asarray(idx.embeddings[row], dtype=np.float32)

    @classmethod
    def project(cls, idx: IndexSet, raw: NDArray[Any]) -> NDArray[np.float32]:
        return idx.project(raw)

    def tuned(self, idx: IndexSet) -> bool:
        return bool(idx.meta.get("space", {}).get("whitened"))

    def vectors(self, idx: IndexSet, rows: Rows) -> NDArray[np.float32]:
        return np.asarray(idx.embeddings[rows], dtype=np.float32)

    def similarities(self, idx: IndexSet, queries: Sequence[QueryFeatures], pool: Rows) -> NDArray[np.float32]:
        X = self.vectors(idx, pool)
        if self.distance == "cosine":  # candidates normalised once, every query image in one product
            Q = sim.l2_normalize(np.stack([q.values["emb"] for q in queries]))
            return sim.to_similarity("embedding", "cosine", np.ascontiguousarray((sim.l2_normalize(X) @ Q.T).T))
        fn = {"euclidean": sim.euclidean_distance, "manhattan": sim.manhattan_distance}[self.distance]
        return np.stack([sim.to_similarity("embedding", self.distance, fn(q.values["emb"], X), dim=X.shape[1])
                         for q in queries])

    def join_state(self, idx: IndexSet) -> NDArray[np.float32]:
        """The inverse norms of the stored vectors (the float16 rows stay memory-mapped)."""
        norms = np.concatenate([np.linalg.norm(np.asarray(idx.embeddings[i : i + _BLOCK], dtype=np.float32), axis=1)
                                for i in range(0, idx.size, _BLOCK)]) if idx.size else np.empty(0, np.float32)
        return (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)

    def pairs(self, idx: IndexSet, state: Any, a: Rows, b: Rows) -> NDArray[np.float32]:
        cos = np.einsum("ij,ij->i", self.vectors(idx, a), self.vectors(idx, b)) * state[a] * state[b]
        return sim.to_similarity("embedding", "cosine", cos)

    def dense(self, idx: IndexSet, a: Rows, r: Rows) -> NDArray[np.float32]:
        return np.clip(sim.l2_normalize(self.vectors(idx, a)) @ sim.l2_normalize(self.vectors(idx, r)).T, 0.0, 1.0)

    def graph_queries(self, idx: IndexSet, state: Any, rows: Rows) -> NDArray[np.float32]:
        return self.vectors(idx, rows)
