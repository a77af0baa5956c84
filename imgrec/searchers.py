"""Where an index's graph searches run: one interface, pluggable backends (the shape of FiftyOne Brain's
``SimilarityIndex``).

A ``Searcher`` answers "the ``count`` nearest images of these query vectors in this graph" (``embedding``,
``color``: square-rooted histograms, ``layout``), as image ids with their distances. The exact re-rank, the
multi-image soft minimum, filters, negatives and the mix stay in the engine, over the snapshot's memory-mapped
per-row features: they mean the same whatever backend found the candidates.

- ``LocalGraphs``: the snapshot's own graphs (one shard, the unsharded index).
- ``ShardedGraphs``: ``shards.json`` names N shards, each holding a graph per measure over the images with
  ``shard_of(image_id, N) == shard`` (a hash of the id); every shard is searched for every query, side by side on threads
  (usearch releases the GIL), for its share of the candidates with a margin (``per_shard``), and the answers are
  merged by distance: the merged top is what one graph's would be wherever each shard's is exact.
- ``RayShards`` (``imgrec.shard_actors``): the same shards, held by Ray actors on a cluster's nodes; a shard that
  does not answer in time is left out and named (``collect_missing``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

GRAPHS = ("embedding", "color", "layout")
SHARDS_FILE = "shards.json"


SHARD_RULE = "fibonacci hash of image_id, mod count"


def shard_of(ids: NDArray[np.int64], count: int) -> NDArray[np.int64]:
    """The shard of each image id: a Fibonacci hash of the id (its top 32 bits), mod ``count``. Stable: an image
    stays in its shard for as long as the index has ``count`` shards, so an incremental build touches only the
    shards whose images changed. Hashed rather than ``id % count``: ids follow the walk's order, and any period in
    it (a burst of shots, a camera's numbering) would put look-alikes in one shard."""
    h = np.asarray(ids, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    return ((h >> np.uint64(32)) % np.uint64(max(int(count), 1))).astype(np.int64)


def shard_name(i: int) -> str:
    return f"shard-{i:03d}"


_MISSING: ContextVar[list[str] | None] = ContextVar("imgrec_missing_shards", default=None)


@contextlib.contextmanager
def collect_missing() -> Iterator[list[str]]:
    """The parts of the collection that the searches run inside this block could not search (``report_missing``)."""
    found: list[str] = []
    token = _MISSING.set(found)
    try:
        yield found
    finally:
        _MISSING.reset(token)


def report_missing(parts: list[str]) -> None:
    """A backend's word that ``parts`` (shards, each named with its share of the collection) were left out."""
    found = _MISSING.get()
    if found is not None:
        found.extend(p for p in parts if p not in found)


@dataclass
class Hits:
    """Per query vector, the nearest image ids (best first; -1 past the last) and their distances (inf there)."""

    keys: NDArray[np.int64]  # (queries, count)
    distances: NDArray[np.float32]  # (queries, count)

    def lists(self) -> list[NDArray[np.int64]]:
        """The ids found per query, without the padding."""
        return [row[row >= 0] for row in self.keys]


class Searcher(Protocol):
    """The graph searches of one index snapshot."""

    shards: int

    def has(self, graph: str) -> bool:
        """Whether the index has this graph (``layout`` is absent for lakes ingested before it)."""
        ...

    def knn(self, graph: str, X: NDArray[np.float32], count: int, ef: int, threads: int) -> Hits:
        """The ``count`` nearest images of each row of ``X`` in ``graph``, searched with breadth ``ef``."""
        ...

    def warm(self, graph: str) -> None:
        """Open the graph now (the first search would otherwise)."""
        ...

    def count(self, graph: str) -> int:
        """The images the graph holds (over all shards)."""
        ...


def _search(index: Any, lock: threading.Lock, X: NDArray[np.float32], count: int, ef: int, threads: int) -> Hits:
    """One usearch graph's answer, padded to (queries, count)."""
    X = np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1)
    keys = np.full((len(X), count), -1, np.int64)
    dist = np.full((len(X), count), np.inf, np.float32)
    if len(index) == 0 or count == 0 or len(X) == 0:
        return Hits(keys, dist)
    with lock:  # expansion_search is a property of the shared graph: set and search together
        index.expansion_search = max(ef, count)
        matches = index.search(X, min(count, len(index)), threads=max(threads, 1))
    k = np.asarray(matches.keys, dtype=np.int64).reshape(len(X), -1)
    d = np.asarray(matches.distances, dtype=np.float32).reshape(len(X), -1)
    counts = np.asarray(matches.counts).reshape(-1) if hasattr(matches, "counts") else np.array([len(matches)])
    valid = np.arange(k.shape[1])[None, :] < counts[:, None]
    w = k.shape[1]
    keys[:, :w] = np.where(valid, k, -1)
    dist[:, :w] = np.where(valid, d, np.inf)
    return Hits(keys, dist)  # usearch answers nearest first


def keys_sorted(h: Hits) -> Hits:
    order = np.argsort(h.distances, axis=1, kind="stable")
    return Hits(np.take_along_axis(h.keys, order, 1), np.take_along_axis(h.distances, order, 1))


def merge(parts: list[Hits], count: int) -> Hits:
    """The ``count`` nearest over several shards' answers (each image is in one shard only)."""
    if len(parts) == 1:
        return parts[0]
    merged = keys_sorted(Hits(np.concatenate([p.keys for p in parts], axis=1),
                              np.concatenate([p.distances for p in parts], axis=1)))
    return Hits(merged.keys[:, :count], merged.distances[:, :count])


MIN_SHARD_EF = 64  # usearch's default breadth: the least a shard is searched with


def per_shard(count: int, ef: int, shards: int) -> tuple[int, int]:
    """(candidates, breadth) each of ``shards`` shards is searched with, for ``count`` merged candidates at breadth
    ``ef``. Images are dealt to shards at random (by id), so a shard holds about count / shards of the true top
    ``count``, give or take its standard deviation: each shard returns that share plus four deviations (at least
    10), searched with the breadth scaled by the same ratio (at least MIN_SHARD_EF): the shards together do little
    more work than one graph, not ``shards`` times as much. One shard: (count, ef)."""
    if shards <= 1:
        return count, ef
    share = count / shards
    c = min(count, max(10, int(np.ceil(share + 4 * np.sqrt(share)))))
    return c, max(c, MIN_SHARD_EF, int(np.ceil(ef * c / max(count, 1))))


def restore(path: Path) -> Any:
    """A saved usearch graph, memory-mapped (its pages are read as searches touch them)."""
    from usearch.index import Index

    return Index.restore(str(path), view=True)


@dataclass
class LocalGraphs:
    """The unsharded index: the snapshot folder's own ``<graph>.usearch`` files."""

    path: Path
    shards: int = 1
    _locks: dict[str, threading.Lock] = field(default_factory=lambda: {g: threading.Lock() for g in GRAPHS},
                                              repr=False)
    _open: dict[str, Any] = field(default_factory=dict, repr=False)
    _open_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def has(self, graph: str) -> bool:
        return (self.path / f"{graph}.usearch").is_file()

    def graph(self, graph: str) -> Any:
        if graph in self._open:  # every search: no lock once open
            return self._open[graph]
        with self._open_lock:
            if graph not in self._open:
                self._open[graph] = restore(self.path / f"{graph}.usearch")
            return self._open[graph]

    def warm(self, graph: str) -> None:
        self.graph(graph)

    def count(self, graph: str) -> int:
        return len(self.graph(graph))

    def knn(self, graph: str, X: NDArray[np.float32], count: int, ef: int, threads: int) -> Hits:
        return _search(self.graph(graph), self._locks[graph], X, count, ef, threads)


@dataclass
class ShardedGraphs:
    """An index of several shards (``shards.json``), each a folder of graphs, searched by fan-out and merged."""

    path: Path
    spec: dict[str, Any]
    full: bool = False  # every shard searched for all ``count`` at breadth ``ef`` (else ``per_shard``'s share)
    _parts: list[LocalGraphs] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._parts = [LocalGraphs(self.path / s["name"]) for s in self.spec["shards"]]

    @property
    def shards(self) -> int:
        return len(self._parts)

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max(min(self.shards, os.cpu_count() or 1), 1), thread_name_prefix="imgrec-shard")

    def has(self, graph: str) -> bool:
        return all(p.has(graph) for p in self._parts)

    def warm(self, graph: str) -> None:
        for p in self._parts:
            p.warm(graph)

    def count(self, graph: str) -> int:
        return sum(p.count(graph) for p in self._parts)

    def knn(self, graph: str, X: NDArray[np.float32], count: int, ef: int, threads: int) -> Hits:
        per = max(1, threads // self.shards)
        c, e = (count, ef) if self.full else per_shard(count, ef, self.shards)
        parts = list(self._pool.map(lambda p: p.knn(graph, X, c, e, per), self._parts))
        return merge(parts, count)


def open_searcher(path: Path) -> Searcher:
    """The backend of the index folder ``path``: sharded where it has ``shards.json``, else its own graphs."""
    spec = path / SHARDS_FILE
    if spec.is_file():
        return ShardedGraphs(path, json.loads(spec.read_text()))
    return LocalGraphs(path)
