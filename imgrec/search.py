"""The query engine: 1 to 5 query images in, the most similar images of the lake out, with scores and timings.

Stages (each timed): decode -> features -> candidates (per query image and measure, over the whole collection:
HNSW for embedding and colour, an exact popcount scan for hashes) -> re-rank (exact similarities of the pooled
candidates to every query image, normalised and fused for mix, aggregated over query images with a soft minimum)
-> metadata (DuckDB).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec import similarity as sim
from imgrec.config import DISTANCES, MAX_QUERY_IMAGES, MEASURES, Config
from imgrec.features.embed import spec
from imgrec.features.extract import content_hash, decode_side, extract
from imgrec.index import IndexSet, StaleIndex
from imgrec.lake import Lake, LakeConnection, LakeError, Manifest

MAX_RANGE_RESULTS = 1000
HISTORY = 2000  # searches remembered per engine for the profiling page
UPLOAD_CACHE = 64  # features of the last uploaded images, by content hash


class QueryError(ValueError):
    """A query a person must change (bad image, unknown id, too many images, ...). ``kind``: what is wrong, for an
    HTTP status: "too_large", "not_image", "unreadable" (an image's ``ImageError.kind``), "not_found" (an id), or
    "bad_request"."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind


class ModelMismatch(LakeError):
    """The model at hand is not the one the lake's embeddings were made with."""


@dataclass(frozen=True)
class Query:
    """One query image: a file, raw bytes (an upload), or an image already in the lake."""

    path: str | None = None
    data: bytes | None = None
    image_id: int | None = None
    name: str = ""

    @classmethod
    def of(cls, item: Query | str | os.PathLike[str] | bytes | int) -> Query:
        if isinstance(item, Query):
            return item
        if isinstance(item, bool):
            raise QueryError("a query is a file, image bytes or an image id")
        if isinstance(item, int | np.integer):
            return cls(image_id=int(item), name=f"id:{int(item)}")
        if isinstance(item, bytes | bytearray):
            return cls(data=bytes(item), name="upload")
        text = os.fspath(item)
        if text.startswith("id:") and text[3:].isdigit():
            return cls(image_id=int(text[3:]), name=text)
        return cls(path=os.path.abspath(Path(text).expanduser()), name=Path(text).name)


@dataclass
class QueryFeatures:
    hist: NDArray[np.float32]
    hashes: NDArray[np.uint64]  # (2,) phash, dhash
    emb: NDArray[np.float32] | None  # in the index's space (whitened and unit norm where the index is)
    image_id: int | None = None
    content_hash: str | None = None
    raw_emb: NDArray[np.float32] | None = None  # the model's output, for uploads (kept in the upload cache)
    layout: NDArray[np.float32] | None = None  # the colour layout in the index's space (None: the index has none)
    raw_layout: NDArray[np.float32] | None = None  # the descriptor as extracted, for uploads


@dataclass
class Result:
    image_id: int
    path: str
    score: float
    scores: dict[str, float]
    rank: int
    collection: str = ""
    relpath: str = ""
    width: int | None = None
    height: int | None = None
    label: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # rank under each single measure, among the candidates
    contributions: dict[str, float] = field(default_factory=dict)  # mix: what each measure added to the score

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float]
    measure: str
    distance: str
    k: int
    candidates: int
    snapshot: int
    queries: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    query_hists: list[NDArray[np.float32]] = field(default_factory=list, repr=False)  # colour of each query image
    query_id: int = 0  # its entry in Engine.history()
    missing: list[str] = field(default_factory=list)  # parts of the collection not searched (a served shard that
    # did not answer in time): the results are from the rest of it

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def to_json(self) -> dict[str, Any]:
        return {
            "results": [r.to_json() for r in self.results], "timings_ms": self.timings_ms,
            "measure": self.measure, "distance": self.distance, "k": self.k, "candidates": self.candidates,
            "snapshot": self.snapshot, "queries": self.queries, "negatives": self.negatives,
            "missing": self.missing,
        }


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        t = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (t - self._t) * 1000.0, 3)
        self._t = t


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
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._filter_cache: dict[tuple[Any, ...], NDArray[np.int64]] = {}  # (snapshot, filters) -> rows
        self._upload_cache: OrderedDict[str, QueryFeatures] = OrderedDict()
        self._query_no = 0
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
            t = _Timer()
            index = None
            if manifest is not None:
                try:
                    index = IndexSet.open(self.lake, expect_snapshot=snap)
                except StaleIndex:
                    if not auto_index:
                        raise
                    from pipelines.index import build_indexes

                    build_indexes(self.config)
                    index = IndexSet.open(self.lake, expect_snapshot=snap)
            t.lap("index_open")
            if index is not None and self.config.shard_address:
                if index.searcher.shards > 1:
                    index.serve_from(self.lake, self.config.shard_address, self.config.shard_timeout_s)
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
        if self.index is not None and "hash" in self.config.weights:
            cols = _hash_cols(DISTANCES["hash"][0])
            self.index.radius_index(cols, self._near_radius(cols), now=True, wait=wait)

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

    def features(self, queries: Sequence[Query], need_embedding: bool, timer: _Timer | None = None
                 ) -> list[QueryFeatures]:
        """Features of each query image; stored ones for images of the lake (nothing recomputed)."""
        timer = timer or _Timer()
        timer.ms.setdefault("decode", 0.0)  # every response reports every stage, 0 when nothing was decoded
        idx = self._require_index()
        model = spec(idx.meta["model"]["name"])
        bins = tuple(idx.meta["color_bins"])
        side = decode_side(model)
        out: list[QueryFeatures] = []
        crops: list[tuple[int, NDArray[np.uint8]]] = []
        fresh: list[int] = []  # positions of query images computed here (not stored, not cached)
        todo: list[tuple[int, bytes, str]] = []  # (position, bytes, name) of the images to decode
        from imgrec.imaging import ImageError, read_file

        known = self.lookup_paths([q.path for q in queries if q.path])
        for q in queries:
            if q.path in known:  # a file of the lake, unchanged since ingestion: its stored features
                q = Query(image_id=known[q.path], name=q.name)
            if q.image_id is not None:
                try:
                    row = int(idx.rows([q.image_id])[0])
                except KeyError:
                    raise QueryError(f"image id {q.image_id} is not in the lake (removed, or never ingested)",
                                     "not_found") from None
                out.append(QueryFeatures(np.asarray(idx.color[row]), np.asarray(idx.hashes[row]),
                                         np.asarray(idx.embeddings[row], dtype=np.float32), q.image_id,
                                         layout=None if idx.layout is None else
                                         np.asarray(idx.layout[row], dtype=np.float32)))
                continue
            data = q.data
            if data is None:
                try:  # a FIFO or device given as a query is refused, not waited on
                    data, _ = read_file(q.path or "", self.config.max_upload_bytes)
                except OSError as exc:
                    raise QueryError(f"cannot read {q.path}: {exc.strerror or exc}") from None
                except ImageError as exc:
                    raise QueryError(f"{q.name}: {exc}", exc.kind) from None
            if len(data) > self.config.max_upload_bytes:
                raise QueryError(f"{q.name}: {len(data) / 1e6:.0f} MB is over the limit of "
                                 f"{self.config.max_upload_bytes / 1e6:.0f} MB", "too_large")
            key = content_hash(data)
            with self._lock:
                hit = self._upload_cache.get(key)
                if hit is not None:
                    self._upload_cache.move_to_end(key)
            if hit is not None and (hit.raw_emb is not None or not need_embedding) and (
                    hit.raw_layout is not None or idx.layout is None):  # the same bytes searched before
                emb = idx.project(hit.raw_emb) if hit.raw_emb is not None else None
                out.append(QueryFeatures(hit.hist, hit.hashes, emb, None, key, hit.raw_emb,
                                         _project_layout(idx, hit.raw_layout), hit.raw_layout))
                continue
            fresh.append(len(out))
            out.append(QueryFeatures(np.empty(0, np.float32), np.empty(0, np.uint64), None, None, key))
            todo.append((len(out) - 1, data, q.name))

        # ONNX Runtime embeds each image as soon as it is decoded, several at once (a session takes concurrent
        # runs; measured side by side, 5 uploads: 87-98 ms end to end instead of 100-104 for decoding all, then one
        # batch). torch embeds the batch on its own threads.
        embedder = self.embedder() if need_embedding and todo else None
        each = embedder is not None and getattr(embedder, "backend", "") == "onnx"

        def one(item: tuple[int, bytes, str]) -> tuple[Any, NDArray[np.float32] | None]:
            try:
                f = extract(item[1], model=model if need_embedding else None, bins=bins, thumb_size=None,
                            max_pixels=self.config.max_pixels, min_side=side, layout=idx.layout is not None)
            except ImageError as exc:
                raise QueryError(f"{item[2] or 'query'}: {exc}", exc.kind) from None
            if not each or f.crop is None:
                return f, None
            t = time.perf_counter()
            emb = embedder.embed(f.crop[None])[0][0]
            f.timings["embed"] = time.perf_counter() - t
            return f, emb

        t0 = time.perf_counter()
        if len(todo) > 1:  # several uploads side by side (Pillow, numpy and ONNX Runtime release the GIL)
            done = list(self._query_pool().map(one, todo))
        else:
            done = [one(item) for item in todo]
        if done:  # the decoding's share of the time the extraction took
            spent = sum(sum(f.timings.values()) for f, _ in done) or 1.0
            wall = (time.perf_counter() - t0) * 1000
            timer.ms["decode"] = round(wall * sum(f.timings["decode"] for f, _ in done) / spent, 3)
        for (pos, _, _), (f, emb) in zip(todo, done, strict=True):
            out[pos].hist, out[pos].hashes = f.hist, f.hashes
            out[pos].raw_layout, out[pos].layout = f.layout, _project_layout(idx, f.layout)
            if emb is not None:
                out[pos].raw_emb, out[pos].emb = emb, idx.project(emb)
            elif f.crop is not None:
                crops.append((pos, f.crop))
        timer.lap("features")
        if crops and embedder is not None:
            emb, _, _ = embedder.embed(np.stack([c for _, c in crops]))
            for j, (pos, _) in enumerate(crops):
                out[pos].raw_emb, out[pos].emb = emb[j], idx.project(emb[j])
        with self._lock:  # re-searching the same upload (other settings, "more like these") costs nothing
            for pos in fresh:
                f = out[pos]
                self._upload_cache[f.content_hash or ""] = QueryFeatures(f.hist, f.hashes, None, None,
                                                                        f.content_hash, f.raw_emb,
                                                                        raw_layout=f.raw_layout)
            while len(self._upload_cache) > UPLOAD_CACHE:
                self._upload_cache.popitem(last=False)
        timer.lap("features")
        timer.ms["features"] = round(max(timer.ms["features"] - timer.ms["decode"], 0.0), 3)
        return out

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
        evaluations that rank thousands of images). ``expand`` (default: on where the lake's embedding space is
        tuned, see ``Config.expand_k``) replaces each embedding query by its alpha query expansion.
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
        timer = _Timer()
        qs = [Query.of(q) for q in queries]
        negs = [Query.of(q) for q in negatives]
        if not 1 <= len(qs) <= MAX_QUERY_IMAGES:
            raise QueryError(f"give 1 to {MAX_QUERY_IMAGES} query images (got {len(qs)})")
        if len(negs) > MAX_QUERY_IMAGES:
            raise QueryError(f"give at most {MAX_QUERY_IMAGES} negative examples (got {len(negs)})")
        if measure not in MEASURES:
            raise QueryError(f"unknown measure {measure!r}: choose one of {', '.join(MEASURES)}")
        if k < 1:
            raise QueryError("k must be at least 1")
        with self._lock:
            idx, conn_snapshot = self._require_index(), self.snapshot
        distance = distance or default_distance(idx, measure)
        if distance not in DISTANCES[measure]:
            raise QueryError(f"{measure} offers the distances {', '.join(DISTANCES[measure])}, not {distance!r}")
        if distance == "layout" and idx.layout is None:
            raise QueryError("this lake's index has no colour layout (its images were ingested before it): choose "
                             "another colour distance, or run imgrec ingest again (it adds the layout to the images that lack it)")
        w = {m: v for m, v in (weights or self.config.weights).items() if v > 0}
        if measure == "mix" and not w:
            raise QueryError("mix needs at least one measure with a positive weight")
        measures = list(w) if measure == "mix" else [measure]
        dists = {m: (distance if m == measure else default_distance(idx, m)) for m in ("color", "hash", "embedding")}
        need_emb = "embedding" in measures
        timer.lap("setup")
        all_feats = self.features(qs + negs, need_emb, timer)
        feats, neg_feats = all_feats[: len(qs)], all_feats[len(qs):]
        spaces = [s for s, on in (
            ("embedding", need_emb and (expand if expand is not None else self.expands)),
            ("layout", "color" in measures and dists["color"] == "layout" and (
                expand if expand is not None else idx.meta.get("color_space", {}).get("whitened")))) if on]
        if self.config.expand_k > 0 and spaces:
            for space in spaces:
                feats = self._expand(idx, feats, space)
            all_feats = feats + neg_feats
            timer.lap("expand")

        # candidates (from the positive query images only)
        excluded = set(int(i) for i in exclude_ids)
        if exclude_query:
            excluded |= {f.image_id for f in all_feats if f.image_id is not None}
            excluded |= self._ids_with_hashes([f.content_hash for f in all_feats if f.content_hash])
        allowed = self._allowed_rows(idx, collections, folders, labels)
        per_query = max(self.config.candidates, 2 * k, MAX_RANGE_RESULTS if threshold is not None else 0)
        if allowed is not None and allowed.size <= self.config.exact_filter_limit:
            pool = allowed
        else:
            def by(m: str) -> list[NDArray[np.int64]]:
                return self._candidates(idx, m, feats, per_query, dists[m], near_only=measure == "mix")

            # mix: the measures' searches side by side (usearch and numpy release the GIL): 1.7 ms less at 400k;
            # each in a copy of this thread's context (a served shard's absence is reported there)
            ctxs = [contextvars.copy_context() for _ in measures]
            parts = list(self._query_pool().map(lambda c, m: c.run(by, m), ctxs, measures)) \
                if len(measures) > 1 else [by(measures[0])]
            found = [rows for part in parts for rows in part]
            if len(feats) > 1:  # what is close to all query images may be in no single image's candidates
                mid = _centroid(feats)
                found += [self._candidates(idx, m, [mid], 2 * per_query, dists[m])[0]  # (mix: hashes: copies only)
                          for m in measures if (m != "embedding" or mid.emb is not None) and (
                              m != "color" or dists["color"] != "layout" or mid.layout is not None) and m != "hash" or
                          measure == "hash"]
            pool = np.unique(np.concatenate(found))
            if allowed is not None:
                pool = np.intersect1d(pool, allowed, assume_unique=True)
                if pool.size < k:
                    pool = allowed
        if excluded and pool.size:
            pool = pool[~np.isin(idx.ids[pool], np.fromiter(excluded, dtype=np.int64))]
        timer.lap("candidates")

        # exact re-rank over the pool
        available = [m for m in ("embedding", "color", "hash") if (details or m in measures) and (
            m != "embedding" or all(f.emb is not None for f in all_feats))]
        S = {m: self._similarities(idx, m, dists[m], all_feats, pool) for m in available}  # (images, pool)
        P = len(qs)
        norm: dict[str, NDArray[np.float32]] = {}
        if measure == "mix":
            per_image, norm = self.mix(idx, {m: S[m] for m in measures}, w, dists)
        else:
            per_image = S[measure]
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
        wg = self.mix_weights(idx, w)
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
            self._attach_metadata(results, idx, pool[order])
        timer.lap("metadata")
        timer.ms["total"] = round(sum(v for s, v in timer.ms.items() if s != "total"), 3)
        resp = SearchResponse(results, timer.ms, measure, distance if measure != "mix" else "fused", k,
                              int(pool.size), conn_snapshot, [q.name for q in qs], [q.name for q in negs],
                              [f.hist for f in feats])
        resp.query_id = self._remember(resp, uploads=sum(q.image_id is None for q in qs + negs))
        return resp

    # --- what happened: the profiling page reads it -------------------------------------------------------------------

    def _remember(self, resp: SearchResponse, uploads: int) -> int:
        with self._lock:
            self._query_no += 1
            self._history.append({
                "query_id": self._query_no, "at": time.time(), "measure": resp.measure, "distance": resp.distance,
                "n_queries": len(resp.queries), "n_negatives": len(resp.negatives), "uploads": uploads,
                "k": resp.k, "results": len(resp.results), "candidates": resp.candidates, "size": self.size,
                "timings_ms": dict(resp.timings_ms),
            })
            return self._query_no

    def record_stage(self, query_id: int, stage: str, ms: float) -> None:
        """Add a stage measured outside the engine (e.g. the app's ``render``) to a remembered search."""
        with self._lock:
            for entry in reversed(self._history):
                if entry["query_id"] == query_id:
                    entry["timings_ms"][stage] = round(float(ms), 3)
                    return

    def history(self) -> list[dict[str, Any]]:
        """The last searches of this engine (oldest first): measure, query count, timings per stage in ms, ..."""
        with self._lock:
            return [{**e, "timings_ms": dict(e["timings_ms"])} for e in self._history]

    # --- pieces ----------------------------------------------------------------------------------------------------

    def mix(self, idx: IndexSet, S: dict[str, NDArray[np.float32]], weights: dict[str, float],
            dists: dict[str, str]) -> tuple[NDArray[np.float32], dict[str, NDArray[np.float32]]]:
        """The mix of per-measure similarities (any shape, the same for every measure): each normalised against the
        collection's random-pair level, then fused by ``Config.mix_fusion`` (per query image where they are
        ``(images, candidates)``; pairs of a join: their weighted mean); (mix, the normalised scores). The hash counts as
        near-duplicate evidence only: 0 beyond ``near_duplicate_bits`` of 128."""
        base = {m: idx.meta.get("baselines", {}).get(m, {}).get(dists[m], 0.0) for m in S}
        if "hash" in base:
            base["hash"] = 1.0 - self.config.near_duplicate_bits / 128
        norm = {m: sim.normalize_to_baseline(S[m], base[m]) for m in S}
        method = self.config.mix_fusion
        weights = self.mix_weights(idx, weights)
        if method in ("adaptive", "rrf") and not all(np.ndim(v) == 2 for v in S.values()):
            method = "weighted"  # pairs of a join: no query's candidates to adapt or rank over
        return sim.fuse_scores(norm, weights, method), norm

    def mix_weights(self, idx: IndexSet, weights: dict[str, float]) -> dict[str, float]:
        """The weights the mix applies on this index: under the gated fusion, colour's weight scaled by how much
        colour agrees with the content on this collection (``similarity.colour_gate``, measured at index build)."""
        if self.config.mix_fusion != "gated" or weights.get("color", 0.0) <= 0 or \
                not any(v > 0 for m, v in weights.items() if m != "color"):
            return weights  # colour alone: what the person asked for
        agreement = idx.meta.get("color_agreement", {}).get("value")
        gate = 1.0 if agreement is None else sim.colour_gate(float(agreement), self.config.mix_gate_floor)
        return {**weights, "color": weights["color"] * gate}

    @property
    def expands(self) -> bool:
        """Whether embedding queries are expanded by default: where the lake's embedding space is tuned."""
        return bool(self.index is not None and self.index.meta.get("space", {}).get("whitened"))

    def _expand(self, idx: IndexSet, feats: list[QueryFeatures], space: str) -> list[QueryFeatures]:
        """Alpha query expansion of each query image's embedding (``space`` "embedding") or colour layout
        ("layout") with its nearest images (itself left out)."""
        k = self.config.expand_k
        measure, distance, attr, vectors = ("embedding", "cosine", "emb", idx.embeddings) if space == "embedding" \
            else ("color", "layout", "layout", idx.layout)
        todo = [f for f in feats if getattr(f, attr) is not None]
        near = iter(self._candidates(idx, measure, todo, k + 1, distance, ef=self.config.expand_ef) if todo else [])
        out = []
        for f in feats:
            q = getattr(f, attr)
            if q is None:
                out.append(f)
                continue
            rows = next(near)
            if f.image_id is not None:
                rows = rows[idx.ids[rows] != f.image_id]
            X = np.asarray(vectors[rows], dtype=np.float32)
            s = X @ q
            top = np.argsort(-s, kind="stable")[:k]
            out.append(replace(f, **{attr: sim.expand_query(q, X[top], s[top], self.config.expand_alpha)}))
        return out

    def _require_index(self) -> IndexSet:
        if self.index is None or self.index.size == 0:
            raise LakeError(f"the lake {self.lake.root} has no images yet: run imgrec ingest FOLDER "
                            f"--lake {self.lake.root}")
        return self.index

    def _candidates(self, idx: IndexSet, measure: str, feats: Sequence[QueryFeatures], count: int, distance: str,
                    near_only: bool = False, ef: int | None = None) -> list[NDArray[np.int64]]:
        """Per query image, the rows of its best ``count`` images under one measure, over the whole collection.

        The graph searches of all query images run as one batch, on ``Config.search_threads`` threads.
        ``near_only`` (mix, where the hash is near-duplicate evidence only): the hash's candidates are only the
        images within ``near_candidate_bits`` (usually none or a few), which keeps the pooled candidates small.
        ``ef``: the graph search's breadth (default ``Config.hnsw_expansion_search``; at least ``count``).
        """
        count = min(count, idx.size)
        if measure == "hash":
            return [self._hash_candidates(idx, f, count, distance, near_only) for f in feats]
        if measure == "color" and distance == "layout":
            graph, X = "layout", np.stack([f.layout for f in feats])
        elif measure == "color":
            graph, X = "color", np.sqrt(np.stack([f.hist for f in feats]).astype(np.float32))
            count = min(idx.size, count * (1 if distance == "hellinger" else 4))
        else:
            graph, X = "embedding", np.stack([f.emb for f in feats])
        threads = min(len(feats), self.config.search_threads or os.cpu_count() or 1)
        return idx.knn(graph, X, count, ef or self.config.hnsw_expansion_search, threads)

    def _near_radius(self, cols: slice) -> int:
        """The radius in bits over the hash words ``cols`` within which the mix's hash finds its own candidates
        (``near_candidate_bits`` per 128, at most ``near_duplicate_bits``)."""
        bits = min(self.config.near_candidate_bits, self.config.near_duplicate_bits)
        return bits * (cols.stop - cols.start) // 2

    def _hash_candidates(self, idx: IndexSet, f: QueryFeatures, count: int, distance: str, near_only: bool
                         ) -> NDArray[np.int64]:
        """One query image's hash candidates: a Hamming scan, or the near-duplicate radius table (near_only)."""
        cols = _hash_cols(distance)
        if near_only:
            radius = self._near_radius(cols)
            table = idx.radius_index(cols, radius)
            if table is not None:  # multi-index hashing: the same rows as the scan below, 5x faster at 400k
                close, dc = table.query(f.hashes[cols])
            else:
                d = sim.hamming_distance(f.hashes[cols], idx.hash_columns[:, cols])
                close = np.flatnonzero(d <= radius)
                dc = d[close]
            if close.size > count:
                close = close[np.argpartition(dc, count - 1)[:count]]
            return close.astype(np.int64)
        d = sim.hamming_distance(f.hashes[cols], idx.hash_columns[:, cols])
        if count >= d.size:
            return np.arange(d.size, dtype=np.int64)
        return np.argpartition(d, count - 1)[:count].astype(np.int64)

    @staticmethod
    def _similarities(idx: IndexSet, measure: str, distance: str, feats: Sequence[QueryFeatures],
                      pool: NDArray[np.int64]) -> NDArray[np.float32]:
        if pool.size == 0:
            return np.empty((len(feats), 0), np.float32)
        if distance in ("cosine", "layout"):  # the embedding or the colour layout: candidates normalised once, every
            # query image in one product
            X = np.asarray((idx.embeddings if measure == "embedding" else idx.layout)[pool], dtype=np.float32)
            Q = sim.l2_normalize(np.stack([f.emb if measure == "embedding" else f.layout for f in feats]))
            return sim.to_similarity(measure, distance, np.ascontiguousarray((sim.l2_normalize(X) @ Q.T).T))
        if measure == "embedding":
            X = np.asarray(idx.embeddings[pool], dtype=np.float32)
            fn = {"euclidean": sim.euclidean_distance, "manhattan": sim.manhattan_distance}[distance]
            return np.stack([sim.to_similarity("embedding", distance, fn(f.emb, X), dim=X.shape[1]) for f in feats])
        if measure == "color":
            X = np.asarray(idx.color[pool], dtype=np.float32)
            bins = tuple(idx.meta["color_bins"])
            if distance == "emd":
                return np.stack([sim.to_similarity("color", distance, sim.emd_distance(f.hist, X, bins))
                                 for f in feats])
            fn = sim.HISTOGRAM_DISTANCES[distance]
            return np.stack([sim.to_similarity("color", distance, fn(f.hist, X)) for f in feats])
        cols = _hash_cols(distance)
        X = np.asarray(idx.hashes[pool][:, cols])
        return np.stack([sim.to_similarity("hash", distance, sim.hamming_distance(f.hashes[cols], X),
                                           dim=64 * (cols.stop - cols.start)) for f in feats])

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
        rows = self._select_rows(idx, collections, folders, labels)
        with self._lock:
            if len(self._filter_cache) >= 32:
                self._filter_cache.pop(next(iter(self._filter_cache)))
            self._filter_cache[key] = rows
        return rows

    def _select_rows(self, idx: IndexSet, collections: Sequence[str] | None, folders: Sequence[str] | None,
                     labels: Sequence[str] | None) -> NDArray[np.int64]:
        where, params = [], []
        if collections:
            where.append(f"collection IN ({', '.join('?' * len(collections))})")
            params += list(collections)
        if folders:
            where.append("(" + " OR ".join("(folder = ? OR starts_with(folder, ?))" for _ in folders) + ")")
            for f in folders:
                f = f.strip("/")
                params += [f, f + "/"]
        if labels:
            where.append("image_id IN (SELECT image_id FROM labels WHERE label IN (SELECT unnest(?)))")
            params.append(list(labels))
        ids = self.cursor().execute(f"SELECT image_id FROM images WHERE {' AND '.join(where)}", params).fetchnumpy()
        found = np.asarray(ids["image_id"], dtype=np.int64)
        found = found[np.isin(found, idx.ids)]
        return idx.rows(np.sort(found)) if found.size else np.empty(0, np.int64)

    def lookup_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """image_id of each path that is an image of the lake whose file is unchanged (same size and mtime)."""
        if not paths or self._snapshot is None:
            return {}
        found = self.index.find_paths(list(paths)) if self.index is not None else None
        if found is None:  # an index without its path table (or none): DuckDB
            found = {path: {"image_id": image_id, "size_bytes": size, "mtime_ns": mtime_ns}
                     for path, image_id, size, mtime_ns in self.cursor().execute(
                         "SELECT path, image_id, size_bytes, mtime_ns FROM images WHERE path IN (SELECT unnest(?))",
                         [list(paths)]).fetchall()}
        out = {}
        for path, row in found.items():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size == row["size_bytes"] and st.st_mtime_ns == row["mtime_ns"]:
                out[path] = int(row["image_id"])
        return out

    def lookup_ids(self, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata rows (with the top label) of images of the lake by id (DuckDB)."""
        if not image_ids:
            return {}
        rows = _dicts(self.cursor().execute(
            "SELECT i.*, l.label FROM images i LEFT JOIN labels l USING (image_id) "
            "WHERE i.image_id IN (SELECT unnest(?))", [[int(i) for i in image_ids]]))
        return {int(r["image_id"]): r for r in rows}

    def _ids_with_hashes(self, hashes: list[str]) -> set[int]:
        if not hashes:
            return set()
        rows = self.cursor().execute(
            f"SELECT image_id FROM images WHERE content_hash IN ({', '.join('?' * len(hashes))})", hashes).fetchall()
        return {int(r[0]) for r in rows}

    def _attach_metadata(self, results: list[Result], idx: IndexSet, rows: NDArray[np.int64]) -> None:
        """From the index's row table (memory-mapped, no query), else from DuckDB."""
        table = idx.metadata
        if table is not None:  # value by value: Table.take would import pyarrow.compute (80 ms) in a fresh process
            cols = {c: table.column(c) for c in ("image_id", "path", "collection", "relpath", "width", "height",
                                                  "label")}
            meta = {}
            for r in rows.tolist():
                m = {c: col[r].as_py() for c, col in cols.items()}
                meta[int(m["image_id"])] = m
        else:
            meta = self.lookup_ids([r.image_id for r in results])
        for res in results:
            m = meta.get(res.image_id)
            if m:
                res.path, res.collection, res.relpath, res.width, res.height, res.label = (
                    m["path"], m["collection"], m["relpath"], m["width"], m["height"], m["label"])

    # --- joins ---------------------------------------------------------------------------------------------------

    def join(self, left: str, right: str, measure: str = "embedding", *, k: int | None = None,
             threshold: float | None = None, **options: Any) -> Any:
        """A similarity join (``imgrec.join``): for every image of ``left`` its ``k`` best in ``right``, or every
        pair scoring at least ``threshold``. Sides: ``all``, a collection, or ``COLLECTION/FOLDER``. An Arrow table
        of left_id, left_path, right_id, right_path, score, score_embedding, score_color, score_hash, rank."""
        from imgrec.join import join

        with one_blas_thread():
            return join(self, left, right, measure, k=k, threshold=threshold, **options)

    # --- lookups for the app and the CLI -----------------------------------------------------------------------------

    def thumbnails(self, image_ids: Sequence[int]) -> dict[int, bytes]:
        """JPEG thumbnails by image id: from the index's memory-mapped store, else (an older index, an id of
        another snapshot) from the lake's table through DuckDB."""
        if not image_ids:
            return {}
        out = self.index.thumbnails(list(image_ids)) if self.index is not None else None
        missing = [int(i) for i in image_ids if out is None or int(i) not in out]
        out = out or {}
        if missing:
            rows = self.cursor().execute(
                "SELECT image_id, thumb FROM thumbnails WHERE image_id IN (SELECT unnest(?))", [missing]).fetchall()
            out.update({int(i): bytes(t) for i, t in rows if t is not None})
        return out

    def sample(self, n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
        """A random sample of images (id, path, label) to browse."""
        return _dicts(self.cursor().execute(
            "SELECT i.image_id, i.path, i.relpath, l.label FROM images i LEFT JOIN labels l USING (image_id) "
            f"USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)})"))


_BLAS: list[Any] = []
_BLAS_LOCK = threading.Lock()


def one_blas_thread() -> Any:
    """numpy's BLAS (OpenBLAS) on one thread while a search runs: its products are small, and OpenBLAS's idle
    threads spin for a while after each call, taking the cores the model's threads need (5 uploads: the embedding
    took 70-97 ms instead of 54-60). A context manager; a no-op where threadpoolctl finds no BLAS."""
    import contextlib

    with _BLAS_LOCK:
        if not _BLAS:
            try:
                from threadpoolctl import ThreadpoolController

                _BLAS.append(ThreadpoolController())
            except ImportError:
                _BLAS.append(None)
    controller = _BLAS[0]
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


def _dicts(cur: Any) -> list[dict[str, Any]]:
    """The rows of an executed DuckDB cursor as dicts keyed by column name."""
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _centroid(feats: Sequence[QueryFeatures]) -> QueryFeatures:
    """The middle of several query images (mean histogram, unit-norm mean embedding, bitwise majority of the
    hashes, which minimises the summed Hamming distance): one more candidate search per measure."""
    hist = np.mean([f.hist for f in feats], axis=0).astype(np.float32)
    embs = [f.emb for f in feats if f.emb is not None]
    emb = sim.l2_normalize(np.mean(embs, axis=0)) if len(embs) == len(feats) else None
    bits = np.unpackbits(np.stack([f.hashes for f in feats]).astype(">u8").view(np.uint8), axis=1)
    majority = np.packbits(2 * bits.sum(axis=0) > len(feats)).view(">u8").astype(np.uint64)
    layouts = [f.layout for f in feats if f.layout is not None]
    layout = sim.l2_normalize(np.mean(layouts, axis=0)) if layouts and len(layouts) == len(feats) else None
    return QueryFeatures(hist, majority, emb, layout=layout)


def default_distance(idx: IndexSet | None, measure: str) -> str:
    """A measure's default distance on this index: colour by its layout where the index has one (lakes ingested
    before it: the histogram's Hellinger distance), else the first of ``DISTANCES``."""
    if measure == "color":
        return "layout" if idx is not None and idx.layout is not None else "hellinger"
    return DISTANCES[measure][0]


def _project_layout(idx: IndexSet, raw: NDArray[np.float32] | None) -> NDArray[np.float32] | None:
    return idx.project_layout(raw) if raw is not None and idx.layout is not None else None


def _hash_cols(distance: str) -> slice:
    """The hash words a distance reads (a slice, so the memory-mapped matrix is viewed, never copied)."""
    return {"phash+dhash": slice(0, 2), "phash": slice(0, 1), "dhash": slice(1, 2)}[distance]


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
