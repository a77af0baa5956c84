"""Build the search structures for the lake's current snapshot (see imgrec.index for the layout).

The HNSW graphs are updated incrementally when the previous index is at hand (removed ids taken out, new ones
added); everything is written to a new ``snap-<N>`` directory and published by rewriting ``CURRENT`` atomically, so a
searcher sees either the old index or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imgrec import similarity as sim
from imgrec.config import Config
from imgrec.index import INDEXES, current_dir, index_root, path_keys, push_index
from imgrec.lake import LAYOUT_DIMS, Lake, LakeError, now
from imgrec.storage import atomic_write_bytes


def _matrix(col: pa.ChunkedArray | pa.Array, dim: int, dtype: Any) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty((0, dim), dtype=dtype)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), dim)


def _raw_embeddings(conn: Any, ids: np.ndarray, dim: int, path: Path, batch: int = 65_536, *,
                    table: str = "embeddings", column: str = "vector") -> np.ndarray:
    """The model's vectors (or another table's vector ``column``) of the images ``ids`` (ascending), in that order,
    streamed from DuckDB batch by batch into a float32 .npy file at ``path``, opened memory-mapped: 1M images are
    5 GB on disk, a batch in memory (reading them as one table held them twice, about 18 GB at 1M)."""
    if len(ids) == 0:
        return np.empty((0, dim), dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(ids), dim))
    seen = np.zeros(len(ids), dtype=bool)
    reader = conn.con.sql(f"SELECT image_id, {column} FROM {table} WHERE image_id IN (SELECT image_id FROM images)"
                          ).to_arrow_reader(batch)
    for b in reader:
        pos = np.searchsorted(ids, b.column(0).to_numpy().astype(np.int64))
        out[pos] = _matrix(b.column(1), dim, np.float32)
        seen[pos] = True
    out.flush()
    if not seen.all():
        raise LakeError(f"{int((~seen).sum())} images lack {table}; the lake is inconsistent")
    return np.load(path, mmap_mode="r")


def baselines(emb: np.ndarray, color: np.ndarray, hashes: np.ndarray, layout: np.ndarray | None = None,
              pairs: int = 4000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median similarity of random pairs of the collection, per measure and distance (the 'chance' level)."""
    n = emb.shape[0]
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n
    out: dict[str, dict[str, float]] = {"embedding": {}, "color": {}, "hash": {}}
    ea, eb = emb[a].astype(np.float32), emb[b].astype(np.float32)
    cos = np.einsum("ij,ij->i", sim.l2_normalize(ea), sim.l2_normalize(eb))
    out["embedding"]["cosine"] = float(np.median(sim.to_similarity("embedding", "cosine", cos)))
    d = np.linalg.norm(ea - eb, axis=1)
    out["embedding"]["euclidean"] = float(np.median(sim.to_similarity("embedding", "euclidean", d)))
    d = np.abs(ea - eb).sum(axis=1)
    out["embedding"]["manhattan"] = float(
        np.median(sim.to_similarity("embedding", "manhattan", d, dim=emb.shape[1])))
    ca, cb = color[a], color[b]
    for name, fn in sim.HISTOGRAM_DISTANCES.items():
        d = np.array([fn(ca[i], cb[i : i + 1])[0] for i in range(min(pairs, 1000))])
        out["color"][name] = float(np.median(sim.to_similarity("color", name, d)))
    if layout is not None:
        cos = np.einsum("ij,ij->i", layout[a].astype(np.float32), layout[b].astype(np.float32))
        out["color"]["layout"] = float(np.median(sim.to_similarity("color", "layout", cos)))
    for name, cols in (("phash+dhash", [0, 1]), ("phash", [0]), ("dhash", [1])):
        x = np.bitwise_count(np.bitwise_xor(hashes[a][:, cols], hashes[b][:, cols])).sum(axis=1)
        out["hash"][name] = float(np.median(sim.to_similarity("hash", name, x, dim=64 * len(cols))))
    return out


def colour_agreement(ids: np.ndarray, emb: np.ndarray, searcher: Any, colour: np.ndarray, colour_graph: str,
                     emb_baseline: float, threads: int, ef: int, sample: int = 1000, k: int = 10, seed: int = 0
                     ) -> dict[str, Any]:
    """How much the colour measure's nearest images agree with the embedding's on this collection
    (``similarity.colour_agreement`` over a seeded sample, neighbours from the graphs just built, through their
    ``imgrec.searchers`` backend): what the gated mix scales colour's weight by."""
    n = len(ids)
    if n <= k + 1:
        return {"value": None, "sample": 0, "k": k}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    E = np.asarray(emb, dtype=np.float32)

    def nearest(graph: str, X: np.ndarray) -> np.ndarray:
        keys = searcher.knn(graph, np.asarray(X, dtype=np.float32), k + 1, ef, threads).keys
        pos = np.clip(np.searchsorted(ids, keys), 0, n - 1)
        pos[(keys < 0) | (ids[pos] != keys)] = -1
        return pos

    def emb_sims(nn: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), k), np.float32)
        for i, (r, cand) in enumerate(zip(rows, nn, strict=True)):
            cand = cand[(cand >= 0) & (cand != r)][:k]
            if cand.size:
                s = sim.normalize_to_baseline(sim.l2_normalize(E[cand]) @ sim.l2_normalize(E[r]), emb_baseline)
                out[i, : cand.size] = s
        return out

    value = sim.colour_agreement(emb_sims(nearest(colour_graph, colour[rows])), emb_sims(nearest("embedding", E[rows])))
    return {"value": round(value, 4), "sample": int(len(rows)), "k": k}


@contextlib.contextmanager
def _index_lock(lake: Lake) -> Iterator[None]:
    index_root(lake).mkdir(parents=True, exist_ok=True)
    with open(index_root(lake) / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # waits for a concurrent build of the same lake
        yield


def build_indexes(config: Config, *, force: bool = False, log: Any = None, processes: bool | None = None
                  ) -> dict[str, Any]:
    """Make the index of the lake's current snapshot (no-op if it exists with the shards asked for; ``force``:
    again, from scratch); its meta. ``config.index_shards`` > 1 deals the images to that many shards
    (``build_shards``; ``processes``: build them in parallel processes, default from the lake's size)."""

    lake = Lake(config.lake)
    manifest = lake.manifest()
    if manifest is None:
        raise LakeError(f"{lake.root} is not an imgrec lake yet: run imgrec ingest FOLDER --lake {lake.root}")
    with _index_lock(lake):
        prev = current_dir(lake)
        prev_meta = json.loads((prev / "meta.json").read_text()) if prev else None
        if prev_meta and prev_meta["snapshot"] == manifest.snapshot and not force and \
                shard_count(config, prev_meta) == _shards_of(prev_meta):
            return prev_meta
        keep = prev.name if prev else ""
        if force:  # from scratch: a new whitening, every image augmented again, new graphs
            prev, prev_meta = None, None
        t0 = time.perf_counter()
        conn = lake.connect(manifest)
        dim, bins = int(manifest.model["dim"]), manifest.bins
        tbl = conn.arrow(
            "SELECT i.image_id, c.hist, h.phash, h.dhash FROM images i "
            "JOIN embeddings e USING (image_id) JOIN color c USING (image_id) JOIN hashes h USING (image_id) "
            "ORDER BY i.image_id")
        n_images = conn.count()
        rows = conn.arrow(
            "SELECT i.image_id, i.path, i.collection, i.relpath, i.width, i.height, l.label, i.size_bytes, "
            "i.mtime_ns FROM images i LEFT JOIN labels l USING (image_id) ORDER BY i.image_id")
        if tbl.num_rows != n_images:
            conn.close()
            raise LakeError(f"{n_images - tbl.num_rows} images lack features; the lake is inconsistent")
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        color = _matrix(tbl.column("hist"), bins, np.float32)
        hashes = np.stack([tbl.column("phash").to_numpy(), tbl.column("dhash").to_numpy()], axis=1).astype(
            np.uint64) if len(ids) else np.empty((0, 2), np.uint64)
        del tbl
        raw_path = index_root(lake) / f".raw-{manifest.snapshot:08d}.npy"
        layout_path = index_root(lake) / f".raw-layout-{manifest.snapshot:08d}.npy"
        try:
            raw = _raw_embeddings(conn, ids, dim, raw_path)
            # the colour layout (lakes ingested before it have none, or only for their newer images: then the
            # colour measure falls back to the histogram until the lake is ingested again with --force)
            has_layout = len(ids) > 0 and conn.con.sql(
                "SELECT count(*) FROM color_layout WHERE image_id IN (SELECT image_id FROM images)").fetchall()[0][0] \
                == len(ids)
            raw_layout = _raw_embeddings(conn, ids, LAYOUT_DIMS, layout_path, table="color_layout") \
                if has_layout else None
        finally:
            conn.close()
        t_read = time.perf_counter() - t0

        t1 = time.perf_counter()
        try:
            space = make_space(config, raw, ids, prev, prev_meta, manifest.model, log=log)
        finally:
            del raw
            raw_path.unlink(missing_ok=True)
        emb = space.vectors
        layout_space = None
        if raw_layout is not None:
            try:
                layout_space = make_space(config, raw_layout, ids, prev, prev_meta, manifest.model, log=log,
                                          kind=LAYOUT_SPACE)
            finally:
                del raw_layout
                layout_path.unlink(missing_ok=True)
        t_space = time.perf_counter() - t1

        out = index_root(lake) / f"snap-{manifest.snapshot:08d}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "embeddings.npy", emb.astype(np.float16))
        if space.whitening is not None:
            np.savez(tmp / "whitening.npz", mean=space.whitening[0], projection=space.whitening[1])
        np.save(tmp / "color.npy", color)
        if layout_space is not None:
            np.save(tmp / LAYOUT_SPACE.vectors_file, layout_space.vectors.astype(np.float16))
            if layout_space.whitening is not None:
                np.savez(tmp / LAYOUT_SPACE.projection_file, mean=layout_space.whitening[0],
                         projection=layout_space.whitening[1])
        np.save(tmp / "hashes.npy", hashes)
        if rows.num_rows == len(ids) and np.array_equal(rows.column("image_id").to_numpy(), ids):
            with pa.OSFile(str(tmp / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as w:
                w.write_table(rows.combine_chunks())  # the results' metadata by row, memory-mapped by searchers
            keys = path_keys(rows.column("path").to_pylist())  # a query's path found without DuckDB
            order = np.argsort(keys, kind="stable")
            np.save(tmp / "path_keys.npy", keys[order])
            np.save(tmp / "path_rows.npy", order.astype(np.int64))
        t_thumbs = time.perf_counter()
        conn = lake.connect(manifest)
        try:
            thumbs = write_thumbnails(conn, ids, prev, tmp)
        finally:
            conn.close()
        t_thumbs = time.perf_counter() - t_thumbs

        t1 = time.perf_counter()
        threads = os.cpu_count() or 1
        graphs = [GraphSpec("embedding", "embeddings.npy", False, "cos", "f16", space.reusable),
                  GraphSpec("color", "color.npy", True, "l2sq", "f32", True)]
        if layout_space is not None:
            graphs.append(GraphSpec("layout", LAYOUT_SPACE.vectors_file, False, "cos", "f16",
                                    layout_space.reusable and prev_meta is not None and
                                    LAYOUT_SPACE.meta_key in prev_meta))
        n_shards = shard_count(config, prev_meta)
        if n_shards == 1:
            in_memory = {"embedding": lambda: emb, "color": lambda: np.sqrt(color),
                         "layout": lambda: layout_space.vectors}
            reused, relinked = _save_graphs(tmp, prev, prev_meta, manifest.model, ids, graphs,
                                            lambda g: in_memory[g.name](), config, threads)
            shard_meta = None
        else:
            shard_meta = build_shards(tmp, prev, prev_meta, manifest.model, ids, graphs, config, n_shards,
                                      processes=processes, log=log)
            reused, relinked = shard_meta.pop("incremental"), shard_meta.pop("relinked")
        t_hnsw = time.perf_counter() - t1
        base = baselines(emb, color, hashes, layout_space.vectors if layout_space is not None else None)
        colour_name = "layout" if layout_space is not None else "color"
        colour_vectors = layout_space.vectors if layout_space is not None else np.sqrt(color)
        from imgrec.searchers import open_searcher

        agreement = colour_agreement(ids, emb, open_searcher(tmp), colour_vectors, colour_name,
                                     base.get("embedding", {}).get("cosine", 0.0), threads, config.hnsw_expansion_search)

        meta = {
            "snapshot": manifest.snapshot, "count": int(len(ids)), "built_at": now().isoformat(),
            "model": manifest.model, "color_bins": list(manifest.color_bins),
            "hnsw": {"connectivity": config.hnsw_connectivity, "expansion_add": config.hnsw_expansion_add,
                     "incremental": reused, "relinked": relinked},
            **({"shards": shard_meta} if shard_meta else {}),
            "space": space.meta,
            **({LAYOUT_SPACE.meta_key: layout_space.meta} if layout_space is not None else {}),
            "baselines": base,
            "color_agreement": agreement,
            "thumbnails": thumbs,
            "build_seconds": {"read": round(t_read, 3), "space": round(t_space, 3), "hnsw": round(t_hnsw, 3),
                              "thumbnails": round(t_thumbs, 3), "total": round(time.perf_counter() - t0, 3)},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        atomic_write_bytes(index_root(lake) / "CURRENT", out.name.encode())
        if lake.remote:  # beside the lake on S3: the new files, then CURRENT
            before = set(json.loads((prev / "thumbs.json").read_text())) if prev and (prev / "thumbs.json").is_file() \
                else set()
            push_index(lake, out, [s for s in json.loads((out / "thumbs.json").read_text()) if s not in before])
            _drop_old_remote(lake, keep={out.name, keep})
        _drop_old(index_root(lake), keep={out.name, keep})
        if log:
            log(f"imgrec: index of snapshot {manifest.snapshot} ({len(ids)} images) built in "
                f"{meta['build_seconds']['total']:.1f}s")
        return meta


@dataclass
class Space:
    """A measure's vectors as searched, and how they were made from the lake's."""

    vectors: np.ndarray  # (n, dims) float32, L2-normalised
    whitening: tuple[np.ndarray, np.ndarray] | None  # (mean, projection), None: the lake's vectors kept
    meta: dict[str, Any]
    reusable: bool  # the previous index's vectors of the images it had are still valid (same space)


@dataclass(frozen=True)
class SpaceKind:
    """Where one kind of space lives in an index folder and which settings make it."""

    name: str  # "embedding" or "layout" (the colour layout)
    meta_key: str  # its entry in meta.json
    projection_file: str
    vectors_file: str

    def params(self, config: Config) -> tuple[int, float, int]:
        """(dims, power, dba_k) from the config."""
        if self.name == "layout":
            return config.layout_dims, config.layout_power, config.layout_dba_k
        return config.embedding_dims, config.whiten_power, config.dba_k


EMBEDDING_SPACE = SpaceKind("embedding", "space", "whitening.npz", "embeddings.npy")
LAYOUT_SPACE = SpaceKind("layout", "color_space", "layout_space.npz", "layout.npy")


def make_space(config: Config, raw: np.ndarray, ids: np.ndarray, prev: Path | None, prev_meta: dict | None,
               model: dict[str, Any], *, log: Any = None, kind: SpaceKind = EMBEDDING_SPACE) -> Space:
    """PCA (whitening where ``power`` > 0; fitted on up to 100k images) then database-side augmentation of the
    lake's vectors: the model's embeddings, or the colour layout descriptors (``kind``).

    Lakes under ``config.space_min_images`` keep the L2-normalised lake vectors. An incremental build keeps the
    previous projection while the lake has not doubled since it was fitted, and then keeps the previous augmented
    vectors of the images it had (their neighbourhood barely moves) and augments only the new images.
    """
    n = len(ids)
    dims, power, dba_k = kind.params(config)
    if n < max(config.space_min_images, 2) or dims <= 0:
        return Space(sim.l2_normalize(raw), None, {"whitened": False, "dims": int(raw.shape[1]), "dba_k": 0}, True)
    params = {"whitened": True, "power": power, "dba_k": dba_k, "raw_dims": int(raw.shape[1])}
    old = (prev_meta or {}).get(kind.meta_key) or {}
    same = (prev is not None and prev_meta is not None and prev_meta.get("model") == model
            and (prev / kind.projection_file).is_file() and (prev / kind.vectors_file).is_file()
            and all(old.get(k) == v for k, v in params.items())
            and old.get("dims") == min(dims, raw.shape[1]) and n <= 2 * int(old.get("fitted_on", 0)))
    if same:
        with np.load(prev / kind.projection_file) as z:
            whitening = (z["mean"], z["projection"])
        meta = old
    else:
        rng = np.random.default_rng(0)
        sample = raw[np.sort(rng.choice(n, min(n, 100_000), replace=False))]
        whitening = sim.fit_whitening(sample, dims, power)
        meta = {**params, "dims": int(whitening[1].shape[1]), "fitted_on": n}
    V = np.concatenate([sim.apply_whitening(raw[i : i + 65536], *whitening) for i in range(0, n, 65536)])
    k = min(dba_k, n)
    if k <= 1:
        return Space(V, whitening, meta, same)
    old_ids = np.load(prev / "ids.npy") if same else np.empty(0, np.int64)
    known = np.isin(ids, old_ids, assume_unique=True)
    new_rows = np.flatnonzero(~known)
    if same and new_rows.size <= EXACT_NEIGHBOURS:
        out = np.empty_like(V)
        old_vecs = np.load(prev / kind.vectors_file, mmap_mode="r")
        out[known] = np.asarray(old_vecs[np.searchsorted(old_ids, ids[known])], dtype=np.float32)
        if new_rows.size:
            out[new_rows] = sim.augment(V, _neighbours(V, k, new_rows))
        return Space(out, whitening, meta, True)
    if log:
        what = "PCA" if power == 0 else "whitening"
        log(f"imgrec: {kind.name} space: {what} to {meta['dims']} dims, augmenting {n:,} images with their {k} "
            "nearest")
    return Space(sim.augment(V, _neighbours(V, k)), whitening, meta, False)


EXACT_NEIGHBOURS = 20_000  # at most this many query rows: exact neighbours by blocked products, else an HNSW graph


def _neighbours(V: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` nearest rows of ``V`` (cosine, unit rows) to each of ``rows`` (default: all), best first."""
    queries = np.arange(len(V)) if rows is None else rows
    if len(queries) <= EXACT_NEIGHBOURS or len(V) <= EXACT_NEIGHBOURS:
        out = np.empty((len(queries), k), np.int64)
        for s in range(0, len(queries), 1024):
            S = V[queries[s : s + 1024]] @ V.T
            S[np.arange(S.shape[0]), queries[s : s + 1024]] = np.inf  # itself first, even among exact duplicates
            top = np.argpartition(-S, k - 1, axis=1)[:, :k]
            out[s : s + 1024] = np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, 1), axis=1), 1)
        return out
    from usearch.index import Index

    # a light graph: the augmentation weights its neighbours 7/8 to 1/8, so 94% of the exact 8 nearest do (measured:
    # 100k images, recall@8 0.94, 4x faster to build and search than the search graph's settings)
    graph = Index(ndim=V.shape[1], metric="cos", dtype="f16", connectivity=8, expansion_add=32, expansion_search=32)
    keys = np.arange(len(V), dtype=np.uint64)
    graph.add(keys, V, threads=os.cpu_count() or 1)
    found = graph.search(V[queries], k, threads=os.cpu_count() or 1)
    nn = np.asarray(found.keys, dtype=np.int64).reshape(len(queries), k)
    nn[nn >= len(V)] = queries[np.nonzero(nn >= len(V))[0]]  # a missing neighbour (tiny graphs): itself again
    has_self = (nn == queries[:, None]).any(axis=1)  # itself first (an exact duplicate may have come first)
    nn[~has_self, -1] = queries[~has_self]
    self_pos = np.argmax(nn == queries[:, None], axis=1)
    nn[np.arange(len(nn)), self_pos] = nn[:, 0]
    nn[:, 0] = queries
    return nn


RELINK_NARROW_EF = 8  # breadth of the first search by which each added image looks for itself (_relink_unreached)
RELINK_WIDE_EF = 64  # breadth of the second, for those the first did not find
RELINK_K = 2  # found among its own this many nearest: reached (2: an exact copy may come first)


def _not_found(index: Any, keys: np.ndarray, vectors: np.ndarray, ef: int, k: int, threads: int) -> np.ndarray:
    """Which of ``keys`` a search for its own vector (breadth ``ef``) does not return among the ``k`` nearest."""
    index.expansion_search = ef
    found = np.asarray(index.search(vectors, min(k, len(index)), threads=max(threads, 1)).keys)
    return ~(found.reshape(len(keys), -1).astype(np.uint64, copy=False) == keys[:, None]).any(axis=1)


def _relink_unreached(index: Any, keys: np.ndarray, vectors: np.ndarray, threads: int, rounds: int = 2) -> int:
    """Add again the images ``keys`` a search of the graph does not reach; how many were.

    usearch's concurrent ``add`` can leave a node stored but linked to by no other (unum-cloud/USearch#735: one to
    four of 240 photos on two threads, which no search ever returned). Each added image searches for itself, narrowly
    (RELINK_NARROW_EF, nearest only), then those not found more widely (RELINK_WIDE_EF): an unreachable node can
    never come back, so every one is among those left, with a few the graph holds badly. They are removed and added
    again once the rest of the graph is there: on every thread, then those still not found on one, where nothing
    races."""
    done = 0
    if len(keys) == 0:
        return 0
    suspects = np.flatnonzero(_not_found(index, keys, vectors, RELINK_NARROW_EF, 1, threads))
    for round_ in range(rounds):
        if suspects.size == 0:
            break
        lost = suspects[_not_found(index, keys[suspects], vectors[suspects], RELINK_WIDE_EF, RELINK_K, threads)]
        if lost.size == 0:
            break
        index.remove(keys[lost])
        # on every thread first (the few that race again are caught by the next round), then on one
        index.add(keys[lost], vectors[lost], threads=threads if round_ == 0 else 1)
        done = done or int(lost.size)  # the images relinked: those of the first round (the next retries some)
        suspects = lost
    return done


def _hnsw(Index: Any, prev: Path | None, prev_meta: dict | None, model: dict, name: str, ids: np.ndarray,
          vectors: np.ndarray, metric: str, dtype: str, config: Config, threads: int) -> tuple[Any, bool, int]:
    """Update the previous graph when there is one (remove gone ids, add new ones), else build from scratch; then
    relink the added images no search reaches. (graph, whether updated, images relinked)."""
    ndim = vectors.shape[1]
    index, added = None, np.ones(len(ids), dtype=bool)
    if prev is not None and prev_meta and (prev / f"{name}.usearch").is_file() and \
            prev_meta["model"] == model and len(ids):
        old_ids = np.load(prev / "ids.npy")
        if old_ids.size and np.isin(ids, old_ids).mean() > 0.5:
            index = Index.restore(str(prev / f"{name}.usearch"))
            if index.ndim != ndim:
                index = None
            else:
                gone = np.setdiff1d(old_ids, ids, assume_unique=True)
                if gone.size:
                    index.remove(gone.astype(np.uint64))
                added = ~np.isin(ids, old_ids, assume_unique=True)
    reused = index is not None
    if index is None:
        index = Index(ndim=ndim, metric=metric, dtype=dtype, connectivity=config.hnsw_connectivity,
                      expansion_add=config.hnsw_expansion_add, expansion_search=config.hnsw_expansion_search)
    relinked = 0
    if added.any():
        keys, vecs = ids[added].astype(np.uint64), np.asarray(vectors[added])
        index.add(keys, vecs, threads=threads)
        relinked = _relink_unreached(index, keys, vecs, threads)
        index.expansion_search = config.hnsw_expansion_search
    return index, reused, relinked


@dataclass(frozen=True)
class GraphSpec:
    """One HNSW graph of an index: its name, the per-row vectors file it is built from (square-rooted where
    ``sqrt``: the colour histograms), usearch's metric and scalar type, and whether the previous index's graph holds
    the same vectors for the images it had (then it is updated rather than rebuilt)."""

    name: str
    vectors_file: str
    sqrt: bool
    metric: str
    dtype: str
    reusable: bool


@dataclass(frozen=True)
class _ShardTask:
    """One shard to build: the index folder being built, the previous index's folder of that shard (for an
    update), and how."""

    tmp: Path
    old: Path | None
    prev_meta: dict | None
    model: dict
    shard: int
    count: int
    graphs: list[GraphSpec]
    config: Config
    threads: int


SHARD_PROCESSES_MIN = 50_000  # smaller lakes build their shards one after another in this process (a spawned
# worker costs about a second to start)


def _shards_of(meta: dict[str, Any] | None) -> int:
    return int(((meta or {}).get("shards") or {}).get("count", 1))


def shard_count(config: Config, prev_meta: dict[str, Any] | None) -> int:
    """The shards the index is to have: ``config.index_shards``, or (0) as many as the current index has."""
    return max(1, int(config.index_shards)) if config.index_shards else _shards_of(prev_meta)


def build_shards(tmp: Path, prev: Path | None, prev_meta: dict | None, model: dict, ids: np.ndarray,
                 graphs: list[GraphSpec], config: Config, count: int, *, processes: bool | None = None,
                 log: Any = None) -> dict[str, Any]:
    """Deal the images to ``count`` shards (``imgrec.searchers.shard_of``) and build each shard's graphs into
    ``tmp/shard-NNN/``, in parallel processes (``processes``; default: lakes of SHARD_PROCESSES_MIN images or more).
    A shard whose images are those of the previous index's shard of the same number, with the same vectors, is
    taken over as it is (hard links); one whose images changed is updated (gone ids removed, new ones added) or
    built. Writes ``shards.json``; returns the meta's ``shards`` entry (with ``incremental``, per graph: whether
    every shard was taken over or updated rather than built, and ``relinked``: images added again, ``_hnsw``)."""
    from imgrec.searchers import SHARD_RULE, SHARDS_FILE, shard_name, shard_of

    workers = min(count, os.cpu_count() or 1)
    if processes is None:
        processes = len(ids) >= SHARD_PROCESSES_MIN
    same_layout = prev is not None and _shards_of(prev_meta) == count and (prev / SHARDS_FILE).is_file()
    which = shard_of(ids, count)
    tasks, kept = [], []
    for i in range(count):
        name = shard_name(i)
        mine = ids[which == i]
        (tmp / name).mkdir()
        np.save(tmp / name / "ids.npy", mine)
        old = prev / name if same_layout else None
        if old is not None and all(g.reusable for g in graphs) and (old / "ids.npy").is_file() and \
                np.array_equal(np.load(old / "ids.npy"), mine) and \
                all((old / f"{g.name}.usearch").is_file() for g in graphs):
            for g in graphs:
                _link_or_copy(old / f"{g.name}.usearch", tmp / name / f"{g.name}.usearch")
            kept.append(i)
            continue
        tasks.append(_ShardTask(tmp, old, prev_meta, model, i, count, graphs, config,
                                max(1, (os.cpu_count() or 1) // (workers if processes else 1))))
    t0 = time.perf_counter()
    nodes = None
    if tasks and _on_ray(config):
        done, nodes = _build_shards_on_ray(tasks, log)
    elif processes and len(tasks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(_build_shard, tasks))
    else:
        done = [_build_shard(t) for t in tasks]
    seconds = time.perf_counter() - t0
    sizes = [int((which == i).sum()) for i in range(count)]
    (tmp / SHARDS_FILE).write_text(json.dumps({
        "count": count, "rule": SHARD_RULE,
        "shards": [{"name": shard_name(i), "images": sizes[i]} for i in range(count)]}, indent=1))
    if log and tasks:
        log(f"imgrec: {len(tasks)} of {count} shards built in {seconds:.1f}s ({len(kept)} unchanged)")
    rebuilt = [d["shard"] for d in done]
    return {"count": count, "rule": SHARD_RULE, "images": sizes, "rebuilt": sorted(rebuilt),
            "unchanged": kept, "parallel": bool(nodes is not None or processes and len(tasks) > 1),
            "engine": "ray" if nodes is not None else "local", **({"nodes": nodes} if nodes is not None else {}),
            "seconds": round(seconds, 3),
            "incremental": {g.name: all(d["reused"][g.name] for d in done) for g in graphs},
            "relinked": {g.name: sum(d["relinked"][g.name] for d in done) for g in graphs}}


def _on_ray(config: Config) -> bool:
    """Whether shard builds go to a Ray cluster: ``--engine ray`` with a cluster to go to (an address, or a process
    already connected); a local Ray instance would only run the processes' work slower."""
    if config.engine != "ray":
        return False
    if config.ray_address:
        return True
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def _shard_rows(tmp: Path, i: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of shard ``i`` in the index folder being built, and their ids."""
    from imgrec.searchers import shard_of

    all_ids = np.load(tmp / "ids.npy", mmap_mode="r")
    rows = np.flatnonzero(shard_of(np.asarray(all_ids), count) == i)
    return rows, np.asarray(all_ids[rows])


def _shard_vectors(tmp: Path, rows: np.ndarray, g: GraphSpec) -> np.ndarray:
    v = np.asarray(np.load(tmp / g.vectors_file, mmap_mode="r")[rows], dtype=np.float32)
    return np.sqrt(v) if g.sqrt else v


def _shard_inputs(t: _ShardTask) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, bytes] | None]:
    """One shard's ids, its vectors per graph, and the previous index's files of it (for an update): what a Ray
    task needs, on a node that may not see the index folder being built."""
    rows, ids = _shard_rows(t.tmp, t.shard, t.count)
    vectors = {g.name: _shard_vectors(t.tmp, rows, g) for g in t.graphs}
    old = None
    if t.old is not None and (t.old / "ids.npy").is_file():
        keep = {"ids.npy"} | {f"{g.name}.usearch" for g in t.graphs if g.reusable}
        old = {f.name: f.read_bytes() for f in t.old.iterdir() if f.name in keep}
    return ids, vectors, old


def _build_shard_task(i: int, ids: np.ndarray, vectors: dict[str, np.ndarray], old: dict[str, bytes] | None,
                      prev_meta: dict | None, model: dict, graphs: list[GraphSpec], config: Config, threads: int
                      ) -> dict[str, Any]:
    """A Ray task: one shard's graphs built in a scratch folder of the node it runs on; the files come back."""
    import tempfile

    import ray

    with tempfile.TemporaryDirectory(prefix="imgrec-shard-") as d:
        prev = None
        if old:
            prev = Path(d) / "prev"
            prev.mkdir()
            for name, data in old.items():
                (prev / name).write_bytes(data)
        out = Path(d) / "out"
        out.mkdir()
        reused, relinked = _save_graphs(out, prev, prev_meta, model, ids, graphs, lambda g: vectors[g.name],
                                        config, threads)
        files = {f.name: f.read_bytes() for f in out.iterdir()}
    return {"shard": i, "reused": reused, "relinked": relinked, "files": files,
            "node": ray.get_runtime_context().get_node_id()}


def _build_shards_on_ray(tasks: list[_ShardTask], log: Any) -> tuple[list[dict[str, Any]], int]:
    """The shard builds as Ray tasks (``--engine ray``), each on as many CPUs as the cluster has per task (at most
    a node's), their inputs and graphs through the object store; (what each returned, nodes used)."""
    from imgrec.searchers import shard_name
    from pipelines.distributed import session

    with session(tasks[0].config.ray_address or None, log or (lambda s: None)) as cluster:
        import ray

        cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        per_node = min((c for c in cpus if c > 0), default=1)
        threads = max(1, min(per_node, cluster.cpus // len(tasks)))
        remote = ray.remote(_build_shard_task).options(num_cpus=threads, max_retries=3, scheduling_strategy="SPREAD")
        refs, where = [], {}
        for t in tasks:
            ids, vectors, old = _shard_inputs(t)
            refs.append(remote.remote(t.shard, ids, vectors, old, t.prev_meta, t.model, t.graphs, t.config, threads))
            where[refs[-1]] = t.tmp / shard_name(t.shard)
        done, pending = [], list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            d = ray.get(ready[0])
            for name, data in d.pop("files").items():
                atomic_write_bytes(where[ready[0]] / name, data)
            done.append(d)
    if log:
        log(f"imgrec: {len(tasks)} shards built as Ray tasks on {len({d['node'] for d in done})} node(s), "
            f"{threads} CPU(s) each")
    return done, len({d["node"] for d in done})


def _build_shard(t: _ShardTask) -> dict[str, Any]:
    """One shard's graphs (a spawned process's work, or in-process for small lakes)."""
    from imgrec.searchers import shard_name

    rows, ids = _shard_rows(t.tmp, t.shard, t.count)
    reused, relinked = _save_graphs(t.tmp / shard_name(t.shard), t.old, t.prev_meta, t.model, ids, t.graphs,
                                    lambda g: _shard_vectors(t.tmp, rows, g), t.config, t.threads)
    return {"shard": t.shard, "reused": reused, "relinked": relinked}


def _save_graphs(dest: Path, prev: Path | None, prev_meta: dict | None, model: dict, ids: np.ndarray,
                 graphs: list[GraphSpec], vectors: Any, config: Config, threads: int
                 ) -> tuple[dict[str, bool], dict[str, int]]:
    """Each graph of ``graphs`` over ``ids`` (``vectors(spec)``: their vectors) into ``dest/<name>.usearch``,
    updated from ``prev``'s where reusable (``_hnsw``); per graph, whether it was, and the images relinked."""
    from usearch.index import Index

    reused, relinked = {}, {}
    for g in graphs:
        index, reused[g.name], relinked[g.name] = _hnsw(Index, prev if g.reusable else None, prev_meta, model,
                                                        g.name, ids, vectors(g), g.metric, g.dtype, config, threads)
        index.save(str(dest / f"{g.name}.usearch"))
        del index
    return reused, relinked


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _drop_old(root: Path, keep: set[str]) -> None:
    for path in root.glob("snap-*"):
        if path.name not in keep and not path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
    used = {name for snap in root.glob("snap-*") if (snap / "thumbs.json").is_file()
            for name in json.loads((snap / "thumbs.json").read_text())}
    for seg in (root / THUMBS_DIR).glob("*.bin") if (root / THUMBS_DIR).is_dir() else []:
        if seg.name not in used:  # a searcher still mapping it keeps its pages (Linux); new ones no longer see it
            seg.unlink(missing_ok=True)


def _drop_old_remote(lake: Lake, keep: set[str]) -> None:
    """The S3 lake's older indexes (not ``keep``), and the thumbnail segments only they used."""
    entries = lake.store.list(INDEXES)
    snaps: dict[str, list[str]] = {}
    for e in entries:
        parts = e.path.split("/")
        if len(parts) >= 3 and parts[1].startswith("snap-"):
            snaps.setdefault(parts[1], []).append(e.path)
    used: set[str] = set()
    for name, files in snaps.items():
        if name in keep:
            with contextlib.suppress(FileNotFoundError, ValueError):
                used |= set(json.loads(lake.store.read_bytes(f"{INDEXES}/{name}/thumbs.json")))
        else:
            for f in files:
                lake.store.delete(f)
    for e in entries:
        parts = e.path.split("/")
        if len(parts) == 3 and parts[1] == THUMBS_DIR and parts[2] not in used:
            lake.store.delete(e.path)


THUMBS_DIR = "thumbs"  # indexes/thumbs/<segment>.bin: the thumbnails' bytes, shared by the snapshots' indexes
REWRITE_GARBAGE = 0.5  # segments are rewritten once this share of their bytes belongs to images no longer there


def write_thumbnails(conn: Any, ids: np.ndarray, prev: Path | None, out: Path) -> dict[str, Any]:
    """The thumbnails of ``ids`` as byte ranges of segment files (``thumbs.npy``: per row segment, offset, length;
    ``thumbs.json``: the segments' names), so a search hands back thumbnails from memory-mapped files instead of a
    DuckDB scan of the Parquet table (0.05 vs 6 ms for 5). An incremental build keeps the previous segments and
    appends one with the new images' thumbnails; once half their bytes are of removed images, everything is
    rewritten. Each segment is written under a temporary name and renamed; never changed afterwards."""
    store = out.parent / THUMBS_DIR
    store.mkdir(parents=True, exist_ok=True)
    locs = np.full((len(ids), 3), -1, dtype=np.int64)  # segment, offset, length (-1: no thumbnail)
    segments: list[str] = []
    todo = np.ones(len(ids), dtype=bool)
    if prev is not None and (prev / "thumbs.npy").is_file():
        old_ids, old_locs = np.load(prev / "ids.npy"), np.load(prev / "thumbs.npy")
        old_segments = json.loads((prev / "thumbs.json").read_text())
        kept = np.isin(ids, old_ids, assume_unique=True)
        pos = np.searchsorted(old_ids, ids[kept])
        live = int(old_locs[pos, 2].clip(0).sum())
        total = sum((store / s).stat().st_size for s in old_segments if (store / s).is_file())
        if all((store / s).is_file() for s in old_segments) and live >= (1 - REWRITE_GARBAGE) * total:
            locs[kept], segments, todo = old_locs[pos], list(old_segments), ~kept
    if todo.any():
        segments.append(_write_segment(conn, ids[todo], locs, np.flatnonzero(todo), len(segments), store))
    np.save(out / "thumbs.npy", locs)
    (out / "thumbs.json").write_text(json.dumps(segments))
    return {"segments": len(segments), "written": int(todo.sum()), "bytes": int(locs[:, 2].clip(0).sum())}


def _write_segment(conn: Any, ids: np.ndarray, locs: np.ndarray, rows: np.ndarray, number: int, store: Path) -> str:
    name = f"seg-{uuid.uuid4().hex[:16]}.bin"
    tmp = store / f".{name}.tmp"
    cur = conn.cursor()
    cur.register("wanted", pa.table({"image_id": pa.array(ids, pa.int64())}))
    reader = cur.sql("SELECT t.image_id, t.thumb FROM thumbnails t JOIN wanted w USING (image_id)").to_arrow_reader(4096)
    offset = 0
    with open(tmp, "wb") as fh:
        for batch in reader:
            found = np.searchsorted(ids, batch.column(0).to_numpy().astype(np.int64))
            for j, blob in zip(found, batch.column(1).to_pylist(), strict=True):
                if blob is None:
                    continue
                fh.write(blob)
                locs[rows[j]] = (number, offset, len(blob))
                offset += len(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, store / name)
    return name


def main() -> int:
    """``python -m pipelines.index``: build the index of the lake whose ``Config`` comes as JSON on stdin (the job an
    engine starts when it finds its index stale, ``imgrec.jobs.build_index``; people run ``imgrec index``)."""
    import sys

    try:
        build_indexes(Config.from_json(sys.stdin.read()), log=lambda s: print(s, file=sys.stderr))
    except LakeError as exc:
        print(f"imgrec: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
