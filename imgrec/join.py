"""Similarity joins of two sets of images of the lake: for every image of LEFT its k best in RIGHT (kNN), or every
pair scoring at least a threshold (range), under one measure. Stored features only (nothing decoded or embedded),
as batched searches through the index: memory is bounded by the batch, never by |LEFT| x |RIGHT|.

A pair's score is the search's score of one image against another without query expansion, so it is the same both
ways: embedding cosine in the index's space, colour 1 - Hellinger, hash 1 - Hamming / 128, mix their normalised
weighted mean (``imgrec.measures.Mix``). A right side of up to ``EXACT_RIGHT`` images is scored exactly (every pair, in
blocks); a larger one is searched through the HNSW graphs (and, for near-duplicates, the multi-index hashing table),
then the candidates are scored exactly. A self-join (both sides the same set) leaves each image's own match out and
lists each pair once, under the image of the two that comes first.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec import measures
from imgrec import similarity as sim

if TYPE_CHECKING:
    import pyarrow as pa

    from imgrec.config import Config
    from imgrec.index import IndexSet
    from imgrec.search import Engine

EXACT_RIGHT = 20_000  # a right side up to this size is scored exactly
CANDIDATES = 64  # graph candidates per left image and measure (at least 4 k), before the exact scores
BATCH = 512  # left images per batch
GRAPH_EF = 64  # graph search breadth (usearch's default; at least the candidates wanted)
MAX_PAIRS = 5_000_000  # a join that would give more pairs stops with JoinError (raise the threshold or this)
COLUMNS = ("left_id", "left_path", "right_id", "right_path", "score", "score_embedding", "score_color", "score_hash",
           "rank")


class JoinError(ValueError):
    """A join a person must change (an unknown side, no k and no threshold, too many pairs, ...)."""


@dataclass(frozen=True)
class Side:
    spec: str
    rows: NDArray[np.int64]  # rows of the index, ascending


def side(engine: Engine, spec: str) -> Side:
    """``all``, a collection, or ``COLLECTION/FOLDER`` (its sub-folders included) -> the index rows it holds."""
    idx = engine.index
    if idx is None:
        raise JoinError("the lake has no index yet: ingest a folder first")
    text = spec.strip().strip("/")
    if text.lower() == "all":
        return Side(spec, np.arange(idx.size, dtype=np.int64))
    cur = engine.cursor()
    collections = [r[0] for r in cur.execute("SELECT collection FROM collections ORDER BY collection").fetchall()]
    name, _, folder = text.partition("/")
    if name not in collections:
        raise JoinError(f"{spec!r} is not a collection of the lake (collections: {', '.join(collections) or 'none'}; "
                        "a folder is COLLECTION/FOLDER; every image: all)")
    if folder:
        ids = cur.execute("SELECT image_id FROM images WHERE collection = ? AND (folder = ? OR starts_with(folder, ?))",
                          [name, folder, folder + "/"]).fetchnumpy()["image_id"]
        if not len(ids) and not cur.execute("SELECT count(*) FROM images WHERE collection = ? AND folder LIKE ?",
                                            [name, folder + "%"]).fetchone()[0]:
            raise JoinError(f"{spec!r}: the collection {name} has no folder {folder!r}")
    else:
        ids = cur.execute("SELECT image_id FROM images WHERE collection = ?", [name]).fetchnumpy()["image_id"]
    ids = np.asarray(ids, dtype=np.int64)
    ids = np.sort(ids[np.isin(ids, idx.ids)])
    return Side(spec, idx.rows(ids) if ids.size else np.empty(0, np.int64))


# --- pair scores ------------------------------------------------------------------------------------------------------


class Features:
    """The measures as pairs are scored (each at its default distance, ``imgrec.measures``), with what each reuses
    over the whole join prepared once (the embeddings' inverse norms, the unit colour layouts or the histograms'
    square roots, the hashes: a few hundred bytes an image in memory; the float16 embeddings stay mapped)."""

    def __init__(self, idx: IndexSet, config: Config | None = None) -> None:
        from imgrec.config import Config

        self.idx = idx
        self.measures = measures.singles(idx, config or Config())
        self.states = {m: measure.join_state(idx) for m, measure in self.measures.items()}

    def pairs(self, a: NDArray[np.int64], b: NDArray[np.int64]) -> dict[str, NDArray[np.float32]]:
        """Every measure's similarity of the pairs (a[i], b[i]) of index rows, as the search computes them."""
        if a.size == 0:
            return {m: np.empty(0, np.float32) for m in self.measures}
        return {m: measure.pairs(self.idx, self.states[m], a, b) for m, measure in self.measures.items()}

    def graph_queries(self, measure: str, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        return self.measures[measure].graph_queries(self.idx, self.states[measure], rows)

    @property
    def hashes(self) -> NDArray[np.uint64]:
        return self.states["hash"]


def pair_similarities(idx: IndexSet, a: NDArray[np.int64], b: NDArray[np.int64]) -> dict[str, NDArray[np.float32]]:
    """Every measure's similarity of the pairs (a[i], b[i]) of index rows (``Features.pairs`` for one call)."""
    return Features(idx).pairs(np.asarray(a, np.int64), np.asarray(b, np.int64))


# --- the join ---------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    engine: Engine
    idx: IndexSet
    measure: str
    k: int | None
    threshold: float | None
    right: NDArray[np.int64]
    in_right: NDArray[np.bool_]
    self_join: bool
    exact: bool
    count: int  # graph candidates per measure
    weights: dict[str, float]
    features: Features
    mix: measures.Mix
    near: Any = None  # the multi-index hashing table of the near-duplicate radius (mix), or of the range (hash)
    threads: int = 1


def _score(plan: _Plan, a: NDArray[np.int64], b: NDArray[np.int64]) -> tuple[NDArray[np.float32], dict[str, Any]]:
    per = plan.features.pairs(a, b)
    if plan.measure != "mix":
        return per[plan.measure], per
    fused, _ = plan.mix.fuse(plan.idx, {m: per[m] for m in plan.weights})
    return fused, per


def _candidates(plan: _Plan, a: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(left rows, right rows) of the candidate pairs of the left rows ``a`` (itself and rows outside RIGHT left
    out, each pair once)."""
    idx = plan.idx
    if plan.exact:  # every pair of the block, as dense matrices; the best (with some slack) scored again below
        if plan.measure == "mix":
            S, _ = plan.mix.fuse(idx, {m: plan.features.measures[m].dense(idx, a, plan.right) for m in plan.weights})
        else:
            S = plan.features.measures[plan.measure].dense(idx, a, plan.right)
        keep = _select(S, plan.k, plan.threshold, a, plan.right, slack=4)
        la, lb = a[keep[0]], plan.right[keep[1]]
    else:
        found: list[NDArray[np.int64]] = []
        measures = ["embedding", "color"] if plan.measure == "mix" else [plan.measure]
        for m in measures:
            if m not in plan.weights and plan.measure == "mix":
                continue
            found.append(_graph(plan, m, a))
        cand = np.concatenate(found, axis=1) if found else np.empty((a.size, 0), np.int64)
        la = np.repeat(a, cand.shape[1])
        lb = cand.reshape(-1)
        if plan.near is not None:  # mix: near-duplicates, by the multi-index table
            near_a, near_b = _near(plan, a)
            la, lb = np.concatenate([la, near_a]), np.concatenate([lb, near_b])
    ok = (lb >= 0) & (lb != la)
    la, lb = la[ok], lb[ok]
    ok = plan.in_right[lb]
    la, lb = la[ok], lb[ok]
    key = np.unique(la * plan.idx.size + lb)  # each pair once
    return key // plan.idx.size, key % plan.idx.size


def _graph(plan: _Plan, measure: str, a: NDArray[np.int64]) -> NDArray[np.int64]:
    """(len(a), count) rows found by a measure's HNSW graph (-1 where fewer), in one batched search."""
    idx, m = plan.idx, plan.features.measures[measure]
    if m.graph is None:
        return _scan_hash(plan, a)
    X = plan.features.graph_queries(measure, a)
    count = min(plan.count, idx.size)
    hits = idx.searcher.knn(m.graph, np.asarray(X, dtype=np.float32), count, GRAPH_EF, plan.threads)
    out = np.full(hits.keys.shape, -1, dtype=np.int64)
    valid = hits.keys >= 0
    out[valid] = idx.rows(hits.keys[valid])
    return out


def _scan_hash(plan: _Plan, a: NDArray[np.int64]) -> NDArray[np.int64]:
    """The ``count`` nearest rows by Hamming distance (an exact scan of RIGHT per left row: the hash measure's
    kNN join over a large right side)."""
    idx = plan.idx
    cols = idx.hash_columns[plan.right]
    count = min(plan.count, plan.right.size)
    out = np.empty((a.size, count), np.int64)
    for i, row in enumerate(a):
        d = sim.hamming_distance(np.asarray(idx.hashes[row]), cols)
        out[i] = plan.right[np.argpartition(d, count - 1)[:count]]
    return out


def _near(plan: _Plan, a: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Pairs (a row, a row within the table's radius), by multi-index hashing, the whole batch at once."""
    from imgrec.mih import query_many

    qi, rows, _ = query_many(plan.near, plan.features.hashes[a])
    return a[qi], rows


def _select(S: NDArray[np.float32], k: int | None, threshold: float | None, a: NDArray[np.int64],
            cols: NDArray[np.int64], slack: int = 0) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(row, column) positions of each row's best ``k`` (+ ``slack``, scored again exactly later) or of every
    score >= ``threshold``; a row's own column is left out."""
    S = S.copy()
    S[a[:, None] == cols[None, :]] = -np.inf
    if threshold is not None:
        r, c = np.nonzero(S >= threshold - 1e-6)
        return r, c
    top = min(int(k or 1) + slack, S.shape[1])
    if top <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    part = np.argpartition(-S, top - 1, axis=1)[:, :top]
    r = np.repeat(np.arange(S.shape[0]), top)
    c = part.reshape(-1)
    ok = np.isfinite(S[r, c])
    return r[ok], c[ok]


def _batch(plan: _Plan, a: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32],
                                                       dict[str, Any], NDArray[np.int32]]:
    """One batch: candidate pairs, scored, each left row's best k (or those over the threshold), ranked."""
    if plan.measure == "hash" and plan.threshold is not None and not plan.exact:  # exact, by the radius table
        la, lb = _near(plan, a)
        ok = (lb != la) & plan.in_right[lb]
        la, lb = la[ok], lb[ok]
    else:
        la, lb = _candidates(plan, a)
    score, per = _score(plan, la, lb)
    if plan.threshold is not None:
        keep = score >= plan.threshold - 1e-6
        la, lb, score = la[keep], lb[keep], score[keep]
        per = {m: v[keep] for m, v in per.items()}
    # per left row: by score, best first (ties by right row), then the first k
    order = np.lexsort((lb, -score, la))
    la, lb, score = la[order], lb[order], score[order]
    per = {m: v[order] for m, v in per.items()}
    starts = np.r_[0, np.flatnonzero(np.diff(la)) + 1] if la.size else np.empty(0, np.int64)
    rank = (np.arange(la.size) - np.repeat(starts, np.diff(np.r_[starts, la.size]))).astype(np.int32) + 1
    if plan.k is not None:
        keep = rank <= plan.k
        la, lb, score, rank = la[keep], lb[keep], score[keep], rank[keep]
        per = {m: v[keep] for m, v in per.items()}
    return la, lb, score, per, rank


def join_pairs(engine: Engine, left: str, right: str, measure: str = "embedding", *, k: int | None = None,
               threshold: float | None = None, batch: int = BATCH, candidates: int = CANDIDATES,
               max_pairs: int = MAX_PAIRS, on_progress: Callable[[int, int], None] | None = None,
               stop: threading.Event | None = None) -> Iterator[pa.RecordBatch]:
    """The pairs of the join, as Arrow record batches of ``COLUMNS`` in left order (see the module's docstring).
    ``on_progress(done, total)``: left images handled so far."""
    import pyarrow as pa

    if measure not in measures.MEASURES:
        raise JoinError(f"unknown measure {measure!r}: choose one of {', '.join(measures.MEASURES)}")
    if (k is None) == (threshold is None):
        raise JoinError("give either k (the k best in RIGHT for every image of LEFT) or a threshold (every pair "
                        "scoring at least it)")
    if k is not None and k < 1:
        raise JoinError("k must be at least 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise JoinError("the threshold is a score between 0 and 1")
    idx = engine.require_index()
    L, R = side(engine, left), side(engine, right)
    in_right = np.zeros(idx.size, dtype=bool)
    in_right[R.rows] = True
    self_join = np.array_equal(L.rows, R.rows)
    weights = {m: v for m, v in engine.config.weights.items() if v > 0}
    exact = R.rows.size <= EXACT_RIGHT or (measure == "hash" and k is not None)
    # oversample when RIGHT is a small part of the lake: the graphs' candidates come from everywhere
    scale = int(np.ceil(idx.size / max(R.rows.size, 1))) if not exact else 1
    count = min(max(candidates, 4 * (k or 0)) * min(scale, 16), idx.size)
    plan = _Plan(engine, idx, measure, k, threshold, R.rows, in_right, self_join, exact, count, weights,
                 Features(idx, engine.config), measures.mix(idx, engine.config, weights))
    if not exact and (measure == "mix" and "hash" in weights or measure == "hash" and threshold is not None):
        from imgrec.mih import RadiusIndex

        radius = min(engine.config.near_candidate_bits, engine.config.near_duplicate_bits) if measure == "mix" \
            else int(np.floor((1.0 - threshold) * 128 + 1e-9))
        plan.near = RadiusIndex.build(plan.features.hashes, radius)
    if exact:  # blocks of LEFT x RIGHT of at most ~4M pairs
        batch = max(1, min(batch, 4_000_000 // max(R.rows.size, 1)))
    workers = min(os.cpu_count() or 1, 4)
    blocks = [L.rows[i : i + batch] for i in range(0, L.rows.size, batch)]
    # a self-join lists each pair once, the first time it comes (left rows in order): a range join whose candidates
    # are symmetric (exact, or the hash table) keeps the pairs from the lower row; a kNN join remembers the k
    # partners each row listed; a range join through the graphs sorts its pairs out at the end
    symmetric = self_join and threshold is not None and (exact or measure == "hash")
    partners = np.full((idx.size, k), -1, np.int64) if self_join and k is not None else None
    collected: list[tuple[Any, ...]] = []
    meta = idx.metadata
    paths = meta.column("path") if meta is not None else None
    n = idx.size
    total = done = 0

    def emit(la: NDArray[np.int64], lb: NDArray[np.int64], score: NDArray[np.float32], per: dict[str, Any],
             rank: NDArray[np.int32]) -> pa.RecordBatch:
        return pa.record_batch({
            "left_id": pa.array(idx.ids[la], pa.int64()), "left_path": _paths(paths, la),
            "right_id": pa.array(idx.ids[lb], pa.int64()), "right_path": _paths(paths, lb),
            "score": pa.array(score, pa.float32()), "score_embedding": pa.array(per["embedding"], pa.float32()),
            "score_color": pa.array(per["color"], pa.float32()), "score_hash": pa.array(per["hash"], pa.float32()),
            "rank": pa.array(rank, pa.int32())}, schema=schema())

    with ThreadPoolExecutor(workers, thread_name_prefix="imgrec-join") as pool:
        results = _ordered(pool, lambda a: _batch(plan, a), blocks, 2 * workers)
        for block, (la, lb, score, per, rank) in zip(blocks, results, strict=True):
            if stop is not None and stop.is_set():
                return
            if symmetric:
                keep = la < lb
            elif partners is not None and la.size:
                keys = la * n + lb
                listed = (partners[lb] == la[:, None]).any(axis=1)  # the right row listed this pair before
                keep = ~(listed | (np.isin(lb * n + la, keys) & (lb < la)))  # ... or earlier in this batch
                partners[la[keep], rank[keep] - 1] = lb[keep]
            else:
                keep = np.ones(la.size, dtype=bool)
            la, lb, score, rank = la[keep], lb[keep], score[keep], rank[keep]
            per = {m: v[keep] for m, v in per.items()}
            total += la.size
            if total > max_pairs:
                raise JoinError(f"more than {max_pairs:,} pairs: raise the threshold (or lower k), or allow more "
                                "with max_pairs / --max-pairs")
            if self_join and threshold is not None and not symmetric:
                collected.append((la, lb, score, per, rank))
            else:
                yield emit(la, lb, score, per, rank)
            done += block.size
            if on_progress is not None:
                on_progress(done, L.rows.size)
    if collected:  # the graphs' range self-join: each pair once, in left order
        la, lb, score, rank = (np.concatenate([c[i] for c in collected]) for i in (0, 1, 2, 4))
        per = {m: np.concatenate([c[3][m] for c in collected]) for m in ("embedding", "color", "hash")}
        _, first = np.unique(np.minimum(la, lb) * n + np.maximum(la, lb), return_index=True)
        first.sort()
        for s0 in range(0, first.size, 65536):
            sel = first[s0 : s0 + 65536]
            yield emit(la[sel], lb[sel], score[sel], {m: v[sel] for m, v in per.items()}, rank[sel])


def _paths(paths: Any, rows: NDArray[np.int64]) -> Any:
    import pyarrow as pa

    if paths is None:
        return pa.nulls(rows.size, pa.string())
    return paths.take(pa.array(rows)).combine_chunks()


def _ordered(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list[Any], window: int) -> Iterator[Any]:
    """``map`` over a thread pool, in order, with at most ``window`` items in flight (bounded memory)."""
    pending: deque[Future[Any]] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))


def join(engine: Engine, left: str, right: str, measure: str = "embedding", **options: Any) -> pa.Table:
    """The whole join as one Arrow table of ``COLUMNS`` (``join_pairs``'s batches together): for every image of
    ``left`` its ``k`` best in ``right``, or every pair scoring at least ``threshold``. Sides: ``all``, a collection,
    or ``COLLECTION/FOLDER``."""
    import pyarrow as pa

    from imgrec.blas import one_blas_thread

    t0 = time.perf_counter()
    with one_blas_thread():
        batches = list(join_pairs(engine, left, right, measure, **options))
    table = pa.Table.from_batches(batches, schema=schema()) if batches else schema().empty_table()
    return table.replace_schema_metadata({"seconds": f"{time.perf_counter() - t0:.3f}"})


def schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("left_id", pa.int64()), ("left_path", pa.string()), ("right_id", pa.int64()),
                      ("right_path", pa.string()), ("score", pa.float32()), ("score_embedding", pa.float32()),
                      ("score_color", pa.float32()), ("score_hash", pa.float32()), ("rank", pa.int32())])


def groups(left_ids: NDArray[np.int64], right_ids: NDArray[np.int64]) -> list[list[int]]:
    """The connected groups of the pairs (image ids), largest first, each sorted: what a range self-join at a
    near-duplicate threshold finds as sets of copies."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = np.asarray(left_ids, dtype=np.int64), np.asarray(right_ids, dtype=np.int64)
    if a.size == 0:
        return []
    ids, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = ids.size
    graph = coo_matrix((np.ones(a.size, np.int8), (inverse[: a.size], inverse[a.size :])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    found: dict[int, list[int]] = {}
    for image_id, label in zip(ids.tolist(), labels.tolist(), strict=True):
        found.setdefault(label, []).append(image_id)
    return sorted((sorted(g) for g in found.values()), key=lambda g: (-len(g), g[0]))
