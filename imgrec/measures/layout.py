"""The colour layout measure (the colour measure's default distance): 928 numbers of where the colours are and how
they come in patches (``imgrec.features.color.layout_descriptor``), PCA'd to the index's space, compared by cosine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.measures.base import Measure, QueryFeatures, Rows

if TYPE_CHECKING:
    from imgrec.index import IndexSet


class ColourLayout(Measure):
    family = "color"
    distances = ("layout",)
    feature = "layout"
    graph = "layout"
    expandable = True
    unavailable = ("this lake's index has no colour layout (its images were ingested before it): choose another "
                   "colour distance, or run imgrec ingest again (it adds the layout to the images that lack it)")

    @classmethod
    def available(cls, idx: IndexSet | None) -> bool:
        return idx is not None and idx.layout is not None

    @classmethod
    def stored(cls, idx: IndexSet, row: int) -> NDArray[np.float32]:
        return np.asarray(idx.layout[row], dtype=np.float32)

    @classmethod
    def project(cls, idx: IndexSet, raw: NDArray[Any]) -> NDArray[np.float32]:
        return idx.project_layout(raw)

    def tuned(self, idx: IndexSet) -> bool:
        return bool(idx.meta.get("color_space", {}).get("whitened"))

    def vectors(self, idx: IndexSet, rows: Rows) -> NDArray[np.float32]:
        return np.asarray(idx.layout[rows], dtype=np.float32)

    def similarities(self, idx: IndexSet, queries: Sequence[QueryFeatures], pool: Rows) -> NDArray[np.float32]:
        Q = sim.l2_normalize(np.stack([q.values["layout"] for q in queries]))
        X = sim.l2_normalize(self.vectors(idx, pool))
        return sim.to_similarity("color", "layout", np.ascontiguousarray((X @ Q.T).T))

    def join_state(self, idx: IndexSet) -> NDArray[np.float32]:
        """Every unit layout vector, in memory (128 float32 an image)."""
        return sim.l2_normalize(np.asarray(idx.layout, dtype=np.float32))

    def pairs(self, idx: IndexSet, state: Any, a: Rows, b: Rows) -> NDArray[np.float32]:
        return sim.to_similarity("color", "layout", np.einsum("ij,ij->i", state[a], state[b]))

    def dense(self, idx: IndexSet, a: Rows, r: Rows) -> NDArray[np.float32]:
        la, lr = sim.l2_normalize(self.vectors(idx, a)), sim.l2_normalize(self.vectors(idx, r))
        return sim.to_similarity("color", "layout", la @ lr.T)

    def graph_queries(self, idx: IndexSet, state: Any, rows: Rows) -> NDArray[np.float32]:
        return state[rows]
