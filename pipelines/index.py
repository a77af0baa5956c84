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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imgrec import similarity as sim
from imgrec.config import Config
from imgrec.index import current_dir, index_root
from imgrec.lake import Lake, LakeError, atomic_write_bytes, now


def _matrix(col: pa.ChunkedArray | pa.Array, dim: int, dtype: Any) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty((0, dim), dtype=dtype)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), dim)


def baselines(emb: np.ndarray, color: np.ndarray, hashes: np.ndarray, pairs: int = 4000, seed: int = 0
              ) -> dict[str, dict[str, float]]:
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
    for name, cols in (("phash+dhash", [0, 1]), ("phash", [0]), ("dhash", [1])):
        x = np.bitwise_count(np.bitwise_xor(hashes[a][:, cols], hashes[b][:, cols])).sum(axis=1)
        out["hash"][name] = float(np.median(sim.to_similarity("hash", name, x, dim=64 * len(cols))))
    return out


@contextlib.contextmanager
def _index_lock(lake: Lake) -> Iterator[None]:
    index_root(lake).mkdir(parents=True, exist_ok=True)
    with open(index_root(lake) / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # waits for a concurrent build of the same lake
        yield


def build_indexes(config: Config, *, force: bool = False, log: Any = None) -> dict[str, Any]:
    """Make the index of the lake's current snapshot (no-op if it exists, unless ``force``); returns its meta."""
    from usearch.index import Index

    lake = Lake(config.lake)
    manifest = lake.manifest()
    if manifest is None:
        raise LakeError(f"{lake.root} is not an imgrec lake yet: run imgrec ingest FOLDER --lake {lake.root}")
    with _index_lock(lake):
        prev = current_dir(lake)
        prev_meta = json.loads((prev / "meta.json").read_text()) if prev else None
        if prev_meta and prev_meta["snapshot"] == manifest.snapshot and not force:
            return prev_meta
        t0 = time.perf_counter()
        conn = lake.connect(manifest)
        dim, bins = int(manifest.model["dim"]), manifest.bins
        tbl = conn.arrow(
            "SELECT i.image_id, e.vector, c.hist, h.phash, h.dhash FROM images i "
            "JOIN embeddings e USING (image_id) JOIN color c USING (image_id) JOIN hashes h USING (image_id) "
            "ORDER BY i.image_id")
        n_images = conn.count()
        conn.close()
        if tbl.num_rows != n_images:
            raise LakeError(f"{n_images - tbl.num_rows} images lack features; the lake is inconsistent")
        ids = tbl.column("image_id").to_numpy().astype(np.int64)
        emb = _matrix(tbl.column("vector"), dim, np.float32)
        color = _matrix(tbl.column("hist"), bins, np.float32)
        hashes = np.stack([tbl.column("phash").to_numpy(), tbl.column("dhash").to_numpy()], axis=1).astype(
            np.uint64) if len(ids) else np.empty((0, 2), np.uint64)
        del tbl
        t_read = time.perf_counter() - t0

        out = index_root(lake) / f"snap-{manifest.snapshot:08d}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "embeddings.npy", emb.astype(np.float16))
        np.save(tmp / "color.npy", color)
        np.save(tmp / "hashes.npy", hashes)

        t1 = time.perf_counter()
        threads = os.cpu_count() or 1
        reused = {}
        for name, vectors, metric, dtype in (
            ("embedding", emb, "cos", "f16"),
            ("color", np.sqrt(color), "l2sq", "f32"),
        ):
            index, reused[name] = _hnsw(Index, prev, prev_meta, manifest.model, name, ids, vectors, metric, dtype, config, threads)
            index.save(str(tmp / f"{name}.usearch"))
        t_hnsw = time.perf_counter() - t1

        meta = {
            "snapshot": manifest.snapshot, "count": int(len(ids)), "built_at": now().isoformat(),
            "model": manifest.model, "color_bins": list(manifest.color_bins),
            "hnsw": {"connectivity": config.hnsw_connectivity, "expansion_add": config.hnsw_expansion_add,
                     "incremental": reused},
            "baselines": baselines(emb, color, hashes),
            "build_seconds": {"read": round(t_read, 3), "hnsw": round(t_hnsw, 3),
                              "total": round(time.perf_counter() - t0, 3)},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        atomic_write_bytes(index_root(lake) / "CURRENT", out.name.encode())
        _drop_old(index_root(lake), keep={out.name, prev.name if prev else ""})
        if log:
            log(f"imgrec: index of snapshot {manifest.snapshot} ({len(ids)} images) built in "
                f"{meta['build_seconds']['total']:.1f}s")
        return meta


def _hnsw(Index: Any, prev: Path | None, prev_meta: dict | None, model: dict, name: str, ids: np.ndarray,
          vectors: np.ndarray, metric: str, dtype: str, config: Config, threads: int) -> tuple[Any, bool]:
    """Update the previous graph when there is one (remove gone ids, add new ones), else build from scratch."""
    ndim = vectors.shape[1]
    if prev is not None and prev_meta and (prev / f"{name}.usearch").is_file() and \
            prev_meta["model"] == model and len(ids):
        old_ids = np.load(prev / "ids.npy")
        if old_ids.size and np.isin(ids, old_ids).mean() > 0.5:
            index = Index.restore(str(prev / f"{name}.usearch"))
            if index.ndim == ndim:
                gone = np.setdiff1d(old_ids, ids, assume_unique=True)
                if gone.size:
                    index.remove(gone.astype(np.uint64))
                new = ~np.isin(ids, old_ids, assume_unique=True)
                if new.any():
                    index.add(ids[new].astype(np.uint64), vectors[new], threads=threads)
                return index, True
    index = Index(ndim=ndim, metric=metric, dtype=dtype, connectivity=config.hnsw_connectivity,
                  expansion_add=config.hnsw_expansion_add, expansion_search=config.hnsw_expansion_search)
    if len(ids):
        index.add(ids.astype(np.uint64), vectors, threads=threads)
    return index, False


def _drop_old(root: Path, keep: set[str]) -> None:
    for path in root.glob("snap-*"):
        if path.name not in keep and not path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
