"""The colour histogram measure: a joint HSV histogram (8 x 4 x 4 bins, L1-normalised) under Hellinger (its graph
holds the square roots, so L2 ranks by Hellinger), chi-square, intersection or EMD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.measures.base import Measure, MeasureError, QueryFeatures, Rows

if TYPE_CHECKING:
    from imgrec.index import IndexSet


class ColourHistogram(Measure):
    family = "color"
    distances = ("hellinger", "chi2", "intersection", "emd")
    feature = "hist"
    graph = "color"

    @classmethod
    def stored(cls, idx: IndexSet, row: int) -> NDArray[np.float32]:
        return np.asarray(idx.color[row])

    @classmethod
    def centroid(cls, values: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        return np.mean(values, axis=0).astype(np.float32)

    def graph_vector(self, value: NDArray[Any]) -> NDArray[np.float32]:
        return np.sqrt(value.astype(np.float32))

    def graph_count(self, idx: IndexSet, count: int) -> int:
        # the graph ranks by Hellinger: the other distances re-rank 4x as many candidates
        return min(idx.size, count * (1 if self.distance == "hellinger" else 4))

    def similarities(self, idx: IndexSet, queries: Sequence[QueryFeatures], pool: Rows) -> NDArray[np.float32]:
        X = np.asarray(idx.color[pool], dtype=np.float32)
        if self.distance == "emd":
            bins = tuple(idx.meta["color_bins"])
            return np.stack([sim.to_similarity("color", "emd", sim.emd_distance(q.values["hist"], X, bins))
                             for q in queries])
        fn = sim.HISTOGRAM_DISTANCES[self.distance]
        return np.stack([sim.to_similarity("color", self.distance, fn(q.values["hist"], X)) for q in queries])

    def _hellinger_only(self) -> None:
        if self.distance != "hellinger":
            raise MeasureError(f"pairs of images are scored by the histogram's Hellinger distance, not {self.distance}")

    def join_state(self, idx: IndexSet) -> NDArray[np.float32]:
        """The square roots of every histogram, in memory."""
        return np.sqrt(np.asarray(idx.color, dtype=np.float32))

    def pairs(self, idx: IndexSet, state: Any, a: Rows, b: Rows) -> NDArray[np.float32]:
        self._hellinger_only()
        diff = state[a] - state[b]
        return sim.to_similarity("color", "hellinger", np.clip(np.sqrt(0.5 * np.einsum("ij,ij->i", diff, diff)),
                                                               0.0, 1.0))

    def dense(self, idx: IndexSet, a: Rows, r: Rows) -> NDArray[np.float32]:
        self._hellinger_only()
        bc = np.sqrt(np.asarray(idx.color[a], dtype=np.float32)) @ np.sqrt(np.asarray(idx.color[r],
                                                                                      dtype=np.float32)).T
        return (1.0 - np.sqrt(np.clip(1.0 - bc, 0.0, 1.0))).astype(np.float32)

    def graph_queries(self, idx: IndexSet, state: Any, rows: Rows) -> NDArray[np.float32]:
        return np.sqrt(np.asarray(idx.color[rows], dtype=np.float32))
