"""The query engine: 1 to 5 query images in, the most similar images of the lake out, with scores and timings.

Stages (each timed): decode -> features -> expansion -> candidates (per query image and measure, over the whole
collection) -> re-rank (exact similarities of the pooled candidates to every query image, fused for mix, aggregated
over query images with a soft minimum) -> metadata. What a measure is and does lives in ``imgrec.measures``; this
module only orchestrates, and never asks which measure it holds.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec import catalog, measures
from imgrec import similarity as sim
from imgrec.blas import one_blas_thread
from imgrec.config import MAX_QUERY_IMAGES, Config
from imgrec.index import IndexSet, StaleIndex
from imgrec.lake import Lake, LakeConnection, LakeError, Manifest
from imgrec.measures import Measure, MeasureError, QueryFeatures, default_distance
from imgrec.query import Featurizer, History, ModelMismatch, Query, QueryError, Result, SearchResponse, Timer

__all__ = ["Engine", "ModelMismatch", "Query", "QueryError", "QueryFeatures", "Result", "SearchResponse",
           "default_distance", "get_engine", "one_blas_thread"]

MAX_RANGE_RESULTS = 1000


class Engine:
    """Search over one lake. Thread-safe; ``refresh()`` picks up a newer snapshot (rebuilding a stale index)."""

    def __init__(self, config: Config | None = None, *, auto_index: bool = True) -> None:
        self.config = config or Config.load()
        self.lake = Lake(self.config.lake)
        self.auto_index = auto_index
        self._lock = threading.RLock()
        self._model_lock = threading.Lock()  # loading the model must not hold up searches that do not need it
        self._embedder: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.notices: list[str] = []
        self._conn: LakeConnection | None = None
        self._manifest: Manifest | None = None  # the snapshot served (pinned until refresh)
        self._snapshot: int | None = None  # None: not open (closed, or not yet)
        self.index: IndexSet | None = None
        self.open_ms: dict[str, float] = {}
        self.startup_ms: dict[str, float] = {}  # first open (index_open, duckdb), model_load; callers may add imports
        self._history = History()
        self._filter_cache: dict[tuple[Any, ...], NDArray[np.int64]] = {}  # (snapshot, filters) -> rows
        self._featurizer = Featurizer(self.config, self.embedder, self._query_pool)
        self.refresh()
        self.startup_ms.update(self.open_ms)

    # --- state -----------------------------------------------------------------------------------------------------

    def refresh(self, auto_index: bool | None = None) -> bool:
        """Re-open the lake if it has a newer snapshot; returns True if something changed.

        A stale or missing index is rebuilt when ``auto_index`` (default: the engine's setting), else StaleIndex is
        raised and the engine keeps serving the snapshot it has. The previous DuckDB connection is left to the
        garbage collector rather than closed, so a search still running on it in another thread finishes.
        """
        auto_index = self.auto_index if auto_index is None else auto_index
        with self._lock:
            manifest = self.lake.manifest()
            snap = manifest.snapshot if manifest else -1
            if self._snapshot == snap:
                return False
            t = Timer()
            index = None
            if manifest is not None:
                try:
                    index = IndexSet.open(self.lake, expect_snapshot=snap)
                except StaleIndex:
                    if not auto_index:
                        raise
                    from imgrec.jobs import build_index

                    build_index(self.config)  # a job in a child process: the engine never imports the pipelines
                    index = IndexSet.open(self.lake, expect_snapshot=snap)
            t.lap("index_open")
            if index is not None and self.config.shard_address:
                if index.searcher.shards > 1:
                    from imgrec.shard_actors import RayShards

                    index.use(RayShards(self.lake, index.path, self.config.shard_address, self.config.shard_timeout_s))
                else:
                    self.notice("the index has one shard: searched in this process, not on the Ray cluster "
                                "(imgrec index --shards N, then imgrec serve-shards)")
                t.lap("shards_connect")
            # the DuckDB connection of this snapshot opens at its first use (``conn``): a search answered from the
            # index (a new photo, an id) needs none
            self._manifest, self._snapshot, self._conn, self.index = manifest, snap, None, index
            self.open_ms = t.ms
            return True

    @property
    def conn(self) -> LakeConnection | None:
        """DuckDB over the served snapshot (opened on first use); None once the engine is closed."""
        with self._lock:
            if self._conn is None and self._snapshot is not None:
                t0 = time.perf_counter()
                self._conn = self.lake.connect(self._manifest)
                self.open_ms["duckdb"] = round((time.perf_counter() - t0) * 1000.0, 3)
                self.startup_ms.setdefault("duckdb", self.open_ms["duckdb"])
            return self._conn

    @property
    def manifest(self) -> Manifest | None:
        """The served snapshot's manifest."""
        return self._manifest

    def close(self) -> None:
        """Release the DuckDB connection (the engine is unusable afterwards)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn, self.index, self._snapshot, self._manifest = None, None, None, None

    @property
    def size(self) -> int:
        return self.index.size if self.index else 0

    @property
    def snapshot(self) -> int:
        return -1 if self._snapshot is None else self._snapshot

    def cursor(self) -> Any:
        """A DuckDB cursor for the calling thread (over the same snapshot)."""
        conn = self.conn
        if conn is None:
            raise LakeError("the lake is not open")
        return conn.cursor()

    def embedder(self) -> Any:
        """The lake's embedding model, loaded once (ONNX Runtime on the CPU where installed, else torch: see
        ``imgrec.features.runtime``); refuses weights other than those the index was built with."""
        with self._model_lock:
            if self._embedder is None:
                from imgrec.features.runtime import load_embedder, resolve

                if self.index is None:
                    raise LakeError("the lake is empty: ingest a folder first")
                recorded = self.index.meta["model"]
                cfg = self.config
                t0 = time.perf_counter()
                backend, _ = resolve(cfg.backend, cfg.device, recorded["name"])
                # ONNX Runtime: every core, several query images embedded side by side (see ``features``); torch:
                # ``query_threads`` (default 1: its threads spin)
                threads = 0 if backend == "onnx" else cfg.query_threads or 1
                emb = load_embedder(recorded["name"], cfg.backend, cfg.device, threads, log=self.notice)
                self.startup_ms["model_load"] = round((time.perf_counter() - t0) * 1000.0, 1)
                if emb.checksum != recorded.get("checksum"):
                    raise ModelMismatch(
                        f"the installed {recorded['name']} weights (checksum {emb.checksum}) differ from those the "
                        f"lake was built with ({recorded.get('checksum')}); re-ingest into a new lake"
                    )
                self._embedder = emb
            return self._embedder

    def notice(self, message: str) -> None:
        """Something a person should know once (e.g. the slower torch fallback): kept in ``notices``, and printed to
        stderr."""
        if message not in self.notices:
            self.notices.append(message)
            print(message, file=sys.stderr)

    def prepare(self, wait: bool = False) -> None:
        """Build what a mix search over a large lake uses beside the index files (the near-duplicate table of the
        default hash distance): in the background, or at once with ``wait``."""
        if self.index is not None:
            for part in measures.mix(self.index, self.config).parts.values():
                part.prepare(self.index, wait=wait)

    def warm_up(self) -> threading.Thread | None:
        """Load the model in a background thread, so that the first upload search does not wait for it (and start
        building the near-duplicate table that mix searches use on large lakes)."""
        self.prepare()
        if self.index is None or self._embedder is not None:
            return None

        def load() -> None:
            try:
                self.embedder()
            except Exception:  # the search that needs the model reports the error to the person
                pass

        thread = threading.Thread(target=load, name="imgrec-model-warm-up", daemon=True)
        thread.start()
        return thread

    def _query_pool(self) -> ThreadPoolExecutor:
        """Threads that decode (and embed) several query images side by side, one per core, made once."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="imgrec-query")
            return self._pool

    # --- features --------------------------------------------------------------------------------------------------

    def features(self, queries: Sequence[Query], need_model: bool, timer: Timer | None = None
                 ) -> list[QueryFeatures]:
        """Features of each query image; stored ones for images of the lake (nothing recomputed)."""
        idx = self.require_index()
        known = self.lookup_paths([q.path for q in queries if q.path])
        return self._featurizer.features(idx, queries, known, need_model, timer or Timer())

    # --- search ----------------------------------------------------------------------------------------------------

    def search(
        self,
        queries: Iterable[Query | str | os.PathLike[str] | bytes | int],
        measure: str = "mix",
        k: int = 5,
        *,
        distance: str | None = None,
        threshold: float | None = None,
        collections: Sequence[str] | None = None,
        folders: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        exclude_query: bool = False,
        exclude_ids: Iterable[int] = (),
        weights: dict[str, float] | None = None,
        aggregate: str = "softmin",
        negatives: Iterable[Query | str | os.PathLike[str] | bytes | int] = (),
        negative_weight: float = 0.5,
        expand: bool | None = None,
        with_metadata: bool = True,
        details: bool = True,
    ) -> SearchResponse:
        """The ``k`` best images (or every image scoring at least ``threshold``) for all query images together.

        ``negatives`` ("less like this") push down images that resemble them: the score loses
        ``negative_weight`` times the image's highest similarity to a negative example. ``details=False`` leaves out
        the scores and ranks of the measures not searched, and ``with_metadata=False`` the DuckDB metadata (for
        evaluations that rank thousands of images). ``expand`` (default: on where the measure's space is tuned, see
        ``Config.expand_k``) replaces each query by its alpha query expansion.
        """
        from imgrec.searchers import collect_missing

        with one_blas_thread(), collect_missing() as missing:
            resp = self._search(queries, measure, k, distance=distance, threshold=threshold, collections=collections,
                                folders=folders, labels=labels, exclude_query=exclude_query, exclude_ids=exclude_ids,
                                weights=weights, aggregate=aggregate, negatives=negatives,
                                negative_weight=negative_weight, expand=expand, with_metadata=with_metadata,
                                details=details)
        resp.missing = list(missing)
        return resp

    def _search(self, queries: Iterable[Query | str | os.PathLike[str] | bytes | int], measure: str, k: int, *,
                distance: str | None, threshold: float | None, collections: Sequence[str] | None,
                folders: Sequence[str] | None, labels: Sequence[str] | None, exclude_query: bool,
                exclude_ids: Iterable[int], weights: dict[str, float] | None, aggregate: str,
                negatives: Iterable[Query | str | os.PathLike[str] | bytes | int], negative_weight: float,
                expand: bool | None, with_metadata: bool, details: bool) -> SearchResponse:
        timer = Timer()
        qs = [Query.of(q) for q in queries]
        negs = [Query.of(q) for q in negatives]
        if not 1 <= len(qs) <= MAX_QUERY_IMAGES:
            raise QueryError(f"give 1 to {MAX_QUERY_IMAGES} query images (got {len(qs)})")
        if len(negs) > MAX_QUERY_IMAGES:
            raise QueryError(f"give at most {MAX_QUERY_IMAGES} negative examples (got {len(negs)})")
        if k < 1:
            raise QueryError("k must be at least 1")
        with self._lock:
            idx, conn_snapshot = self.require_index(), self.snapshot
        try:
            sel = measures.select(idx, measure, distance, weights or self.config.weights, self.config)
        except MeasureError as exc:
            raise QueryError(str(exc)) from None
        searched = list(sel.fusion.parts.values())
        timer.lap("setup")
        all_feats = self.features(qs + negs, any(m.needs_model for m in searched), timer)
        feats, neg_feats = all_feats[: len(qs)], all_feats[len(qs):]
        expanding = [m for m in searched if m.expandable and (expand if expand is not None else m.tuned(idx))]
        if self.config.expand_k > 0 and expanding:
            for m in expanding:
                feats = self._expand(idx, feats, m)
            all_feats = feats + neg_feats
            timer.lap("expand")

        # candidates (from the positive query images only)
        excluded = set(int(i) for i in exclude_ids)
        if exclude_query:
            excluded |= {f.image_id for f in all_feats if f.image_id is not None}
            excluded |= catalog.ids_with_hashes(self.cursor, [f.content_hash for f in all_feats if f.content_hash])
        allowed = self._allowed_rows(idx, collections, folders, labels)
        per_query = max(self.config.candidates, 2 * k, MAX_RANGE_RESULTS if threshold is not None else 0)
        if allowed is not None and allowed.size <= self.config.exact_filter_limit:
            pool = allowed
        else:
            fused = sel.fusion.fused

            def by(m: Measure) -> list[NDArray[np.int64]]:
                return self._candidates(idx, m, feats, per_query, fused=fused)

            # several measures side by side (usearch and numpy release the GIL): 1.7 ms less at 400k; each in a
            # copy of this thread's context (a served shard's absence is reported there)
            ctxs = [contextvars.copy_context() for _ in searched]
            parts = list(self._query_pool().map(lambda c, m: c.run(by, m), ctxs, searched)) \
                if len(searched) > 1 else [by(searched[0])]
            found = [rows for part in parts for rows in part]
            if len(feats) > 1:  # what is close to all query images may be in no single image's candidates
                mid = _centroid(idx, feats)
                found += [self._candidates(idx, m, [mid], 2 * per_query)[0] for m in searched
                          if mid.get(m.feature) is not None and not (fused and m.near_duplicates_in_mix)]
            pool = np.unique(np.concatenate(found))
            if allowed is not None:
                pool = np.intersect1d(pool, allowed, assume_unique=True)
                if pool.size < k:
                    pool = allowed
        if excluded and pool.size:
            pool = pool[~np.isin(idx.ids[pool], np.fromiter(excluded, dtype=np.int64))]
        timer.lap("candidates")

        # exact re-rank over the pool
        available = {name: m for name, m in sel.singles.items() if (details or name in sel.fusion.parts) and
                     all(f.get(m.feature) is not None for f in all_feats)}
        S = {name: _similarities(idx, m, all_feats, pool) for name, m in available.items()}  # (images, pool)
        P = len(qs)
        per_image, norm = sel.fusion.fuse(idx, {name: S[name] for name in sel.fusion.parts})
        tau = self.config.softmin_tau
        score = sim.aggregate(per_image[:P], aggregate, tau) if pool.size else np.empty(0, np.float32)
        if neg_feats and pool.size:
            score = sim.penalize(score, per_image[P:], negative_weight)
        order = np.argsort(-score, kind="stable")
        if threshold is not None:
            order = order[score[order] >= threshold][:MAX_RANGE_RESULTS]
        else:
            order = order[:k]
        per_measure = {m: sim.aggregate(S[m][:P], aggregate, tau) if pool.size else np.empty(0, np.float32)
                       for m in available}
        ranks = {m: sim.ranks_within(per_measure[m], order) for m in available}
        wg = sel.fusion.weights_on(idx)
        total_w = sum(v for v in wg.values() if v > 0)
        contrib = {m: wg[m] / total_w * sim.aggregate(norm[m][:P, order], aggregate, tau) for m in norm} \
            if order.size else {}
        timer.lap("rerank")

        results = [
            Result(int(idx.ids[pool[j]]), "", float(score[j]), {m: float(per_measure[m][j]) for m in available},
                   r + 1, ranks={m: int(ranks[m][r]) for m in available},
                   contributions={m: float(contrib[m][r]) for m in contrib})
            for r, j in enumerate(order)
        ]
        if with_metadata:  # paths, labels, sizes (evaluations ranking thousands of ids skip it)
            catalog.attach_metadata(self.cursor, results, idx, pool[order])
        timer.lap("metadata")
        timer.ms["total"] = round(sum(v for s, v in timer.ms.items() if s != "total"), 3)
        hist = [f.get("hist") for f in feats]
        resp = SearchResponse(results, timer.ms, measure, sel.distance, k, int(pool.size), conn_snapshot,
                              [q.name for q in qs], [q.name for q in negs], [h for h in hist if h is not None])
        resp.query_id = self._history.remember(resp, uploads=sum(q.image_id is None for q in qs + negs),
                                               size=self.size)
        return resp

    # --- what happened: the profiling page reads it -------------------------------------------------------------------

    def record_stage(self, query_id: int, stage: str, ms: float) -> None:
        """Add a stage measured outside the engine (e.g. the app's ``render``) to a remembered search."""
        self._history.record_stage(query_id, stage, ms)

    def history(self) -> list[dict[str, Any]]:
        """The last searches of this engine (oldest first): measure, query count, timings per stage in ms, ..."""
        return self._history.entries()

    # --- pieces ----------------------------------------------------------------------------------------------------

    def mix(self, weights: dict[str, float] | None = None) -> measures.Mix:
        """The mix of this index (its parts at their default distances) with ``weights`` (default: the config's):
        ``fuse`` its parts' similarities, ``weights_on`` the weights it applies here."""
        return measures.mix(self.require_index(), self.config, weights)

    def _expand(self, idx: IndexSet, feats: list[QueryFeatures], m: Measure) -> list[QueryFeatures]:
        """Alpha query expansion of each query image's feature of the measure ``m`` with its nearest images
        (itself left out)."""
        k = self.config.expand_k
        todo = [f for f in feats if f.get(m.feature) is not None]
        near = iter(self._candidates(idx, m, todo, k + 1, ef=self.config.expand_ef) if todo else [])
        out = []
        for f in feats:
            q = f.get(m.feature)
            if q is None:
                out.append(f)
                continue
            rows = next(near)
            if f.image_id is not None:
                rows = rows[idx.ids[rows] != f.image_id]
            X = m.vectors(idx, rows)
            s = X @ q
            top = np.argsort(-s, kind="stable")[:k]
            out.append(replace(f, values={**f.values, m.feature: sim.expand_query(q, X[top], s[top],
                                                                                  self.config.expand_alpha)}))
        return out

    def require_index(self) -> IndexSet:
        """The served index; LakeError where the lake has no images yet."""
        if self.index is None or self.index.size == 0:
            raise LakeError(f"the lake {self.lake.root} has no images yet: run imgrec ingest FOLDER "
                            f"--lake {self.lake.root}")
        return self.index

    def _candidates(self, idx: IndexSet, m: Measure, feats: Sequence[QueryFeatures], count: int, *,
                    fused: bool = False, ef: int | None = None) -> list[NDArray[np.int64]]:
        """Per query image, the rows of its best ``count`` images under one measure, over the whole collection; the
        graph searches of all query images in one batch on ``Config.search_threads`` threads. ``ef``: the graph
        search's breadth (default ``Config.hnsw_expansion_search``; at least ``count``)."""
        threads = min(len(feats), self.config.search_threads or os.cpu_count() or 1)
        return m.candidates(idx, feats, min(count, idx.size), ef=ef or self.config.hnsw_expansion_search,
                            threads=threads, fused=fused)

    def _allowed_rows(self, idx: IndexSet, collections: Sequence[str] | None, folders: Sequence[str] | None,
                      labels: Sequence[str] | None = None) -> NDArray[np.int64] | None:
        """Rows passing the metadata filters, selected by DuckDB (remembered per snapshot); None when no filter."""
        if not collections and not folders and not labels:
            return None
        key = (self.snapshot, tuple(collections or ()), tuple(folders or ()), tuple(labels or ()))
        with self._lock:
            cached = self._filter_cache.get(key)
        if cached is not None:
            return cached
        rows = catalog.select_rows(self.cursor, idx, collections, folders, labels)
        with self._lock:
            if len(self._filter_cache) >= 32:
                self._filter_cache.pop(next(iter(self._filter_cache)))
            self._filter_cache[key] = rows
        return rows

    def lookup_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """image_id of each path that is an image of the lake whose file is unchanged (same size and mtime)."""
        return catalog.lookup_paths(self.cursor, self.index, paths) if paths and self._snapshot is not None else {}

    def lookup_ids(self, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata rows (with the top label) of images of the lake by id (DuckDB)."""
        return catalog.lookup_ids(self.cursor, image_ids)

    def thumbnails(self, image_ids: Sequence[int]) -> dict[int, bytes]:
        """JPEG thumbnails by image id (the index's store, else the lake's table)."""
        return catalog.thumbnails(self.cursor, self.index, image_ids)

    def sample(self, n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
        """A random sample of images (id, path, label) to browse."""
        return catalog.sample(self.cursor, n, seed)


def _similarities(idx: IndexSet, m: Measure, feats: Sequence[QueryFeatures], pool: NDArray[np.int64]
                  ) -> NDArray[np.float32]:
    if pool.size == 0:
        return np.empty((len(feats), 0), np.float32)
    return m.similarities(idx, feats, pool)


def _centroid(idx: IndexSet, feats: Sequence[QueryFeatures]) -> QueryFeatures:
    """The middle of several query images, feature by feature (those every one of them has): one more candidate
    search per measure."""
    return QueryFeatures({cls.feature: cls.centroid([f.values[cls.feature] for f in feats])
                          for cls in measures.features_on(idx) if all(f.get(cls.feature) is not None for f in feats)})


_ENGINES: dict[Path, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(config: Config | None = None) -> Engine:
    """One engine per lake per process (shared by threads and app sessions)."""
    config = config or Config.load()
    with _ENGINES_LOCK:
        engine = _ENGINES.get(config.lake)
        if engine is None:
            engine = _ENGINES[config.lake] = Engine(config)
        return engine
