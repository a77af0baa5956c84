"""The interface every single measure implements, and the query features it reads.

A measure is one notion of "similar" with one distance: it says which stored feature it reads, where its
candidates come from (a graph of the index's ``Searcher``, or an exact scan), how it scores query images against
rows of the index exactly (a similarity in [0, 1], 1 = identical), and how pairs of stored rows score (joins). The
engine (``imgrec.search``) only orchestrates; it never asks which measure it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from imgrec.config import Config
    from imgrec.index import IndexSet

Rows = NDArray[np.int64]


class MeasureError(ValueError):
    """A measure or distance this index cannot serve (a person must choose another)."""


@dataclass
class QueryFeatures:
    """One query image's features by name (``Measure.feature``), in the index's space. ``raw``: the features as
    extracted where the index's space differs (an upload's model vector and colour layout), kept by the upload cache
    so that a later index can project them again."""

    values: dict[str, NDArray[Any]]
    image_id: int | None = None
    content_hash: str | None = None
    raw: dict[str, NDArray[Any]] = field(default_factory=dict)

    def get(self, feature: str) -> NDArray[Any] | None:
        return self.values.get(feature)


class Measure(ABC):
    """One measure with one of its distances, over one index. Subclasses declare what they are (class attributes)
    and answer the same questions: features, candidates, exact similarities, pair scores."""

    family: ClassVar[str]  # the measure a person picks: "color", "hash" or "embedding"
    distances: ClassVar[tuple[str, ...]]  # the distances this class serves, its default first
    feature: ClassVar[str]  # the query feature it reads (``QueryFeatures.values``)
    graph: ClassVar[str | None] = None  # the Searcher's graph of its candidates; None: an exact scan
    needs_model: ClassVar[bool] = False  # the feature comes from the embedding model (uploads: the model is loaded)
    expandable: ClassVar[bool] = False  # alpha query expansion in its space, where the space is tuned
    near_duplicates_in_mix: ClassVar[bool] = False  # in a mix: evidence of near-duplicates only
    unavailable: ClassVar[str] = ""  # why an index may lack it (``available``)

    def __init__(self, distance: str, config: Config) -> None:
        self.distance = distance
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.distance!r})"

    # --- what an index holds -----------------------------------------------------------------------------------------

    @classmethod
    def available(cls, idx: IndexSet | None) -> bool:
        """Whether the index holds this measure's features (and graph)."""
        return True

    @classmethod
    @abstractmethod
    def stored(cls, idx: IndexSet, row: int) -> NDArray[Any]:
        """A row's feature as a query (nothing recomputed)."""

    @classmethod
    def project(cls, idx: IndexSet, raw: NDArray[Any]) -> NDArray[Any]:
        """A freshly extracted feature in the index's space (default: as it is)."""
        return raw

    @classmethod
    def centroid(cls, values: Sequence[NDArray[Any]]) -> NDArray[Any]:
        """The middle of several query images' features (one more candidate search)."""
        from imgrec import similarity as sim

        return sim.l2_normalize(np.mean(values, axis=0))

    def tuned(self, idx: IndexSet) -> bool:
        """Whether the index's space of this measure is fitted on the collection (query expansion's default)."""
        return False

    def baseline(self, idx: IndexSet) -> float:
        """The similarity of two random images of the collection (measured at index build): the mix's 0."""
        return float(idx.meta.get("baselines", {}).get(self.family, {}).get(self.distance, 0.0))

    def prepare(self, idx: IndexSet, *, wait: bool = False) -> None:
        """Build what its searches on this index use beside the index files (default: nothing)."""
        return None

    # --- search ------------------------------------------------------------------------------------------------------

    def candidates(self, idx: IndexSet, queries: Sequence[QueryFeatures], count: int, *, ef: int, threads: int,
                   fused: bool = False) -> list[Rows]:
        """Per query image, the rows of its best ``count`` images over the whole collection, through the graph (all
        query images in one batched search). ``fused``: the measure is a part of a mix."""
        X = np.stack([self.graph_vector(q.values[self.feature]) for q in queries])
        return idx.knn(str(self.graph), X, self.graph_count(idx, count), ef, threads)

    def graph_vector(self, value: NDArray[Any]) -> NDArray[Any]:
        """A feature as the graph searches it."""
        return value

    def graph_count(self, idx: IndexSet, count: int) -> int:
        """How many graph candidates give ``count`` good ones under this distance."""
        return count

    def vectors(self, idx: IndexSet, rows: Rows) -> NDArray[np.float32]:
        """Stored features of rows, as searched (expandable measures: the expansion's neighbours)."""
        raise NotImplementedError(f"{self!r} has no vectors to expand with")

    @abstractmethod
    def similarities(self, idx: IndexSet, queries: Sequence[QueryFeatures], pool: Rows) -> NDArray[np.float32]:
        """Exact similarities, (query images, pool), in [0, 1] (1 = identical)."""

    # --- joins: pairs of stored rows ---------------------------------------------------------------------------------

    def join_state(self, idx: IndexSet) -> Any:
        """What ``pairs`` and ``graph_queries`` reuse over a whole join (computed once)."""
        return None

    @abstractmethod
    def pairs(self, idx: IndexSet, state: Any, a: Rows, b: Rows) -> NDArray[np.float32]:
        """Similarities of the pairs of rows (a[i], b[i])."""

    @abstractmethod
    def dense(self, idx: IndexSet, a: Rows, r: Rows) -> NDArray[np.float32]:
        """(len(a), len(r)) similarities of every pair of two sets of rows."""

    def graph_queries(self, idx: IndexSet, state: Any, rows: Rows) -> NDArray[np.float32]:
        """Stored rows as queries of the measure's graph."""
        raise NotImplementedError(f"{self!r} has no graph")
