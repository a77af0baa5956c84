"""Search structures for one snapshot of the lake, opened memory-mapped.

``indexes/snap-<N>/`` holds the image ids (sorted), the features as .npy matrices (embeddings in float16 as searched:
PCA-whitened and augmented for lakes of 1000 images or more, see ``pipelines.index.make_space``; colour histograms;
packed hashes), ``rows.arrow`` (each row's path, collection, size and label: the results' metadata without a
DuckDB query), ``whitening.npz`` (mean and projection from the model's vectors, where whitened), the colour layout
(``layout.npy``, float16, PCA'd by ``layout_space.npz`` and augmented like the embeddings; absent for lakes ingested
before it), usearch HNSW graphs (embedding and layout: cosine; colour: L2 over square-rooted histograms, which ranks
exactly as the Hellinger distance), and ``meta.json`` (snapshot, model, spaces, random-pair baselines).
``indexes/CURRENT`` names the directory in use. An index whose snapshot differs from the lake's is stale.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec.lake import Lake

if TYPE_CHECKING:
    from imgrec.mih import RadiusIndex
    from imgrec.searchers import Searcher

RADIUS_INDEX_MIN = 50_000  # smaller lakes scan every hash for near-duplicates (under 0.2 ms)
RADIUS_INDEX_AFTER = 3  # built (in the background) once this many searches asked for it: never for a one-off search


class StaleIndex(RuntimeError):
    """The index on disk does not cover the lake's current snapshot (or there is none)."""


def path_keys(paths: list[str]) -> NDArray[np.uint64]:
    """64-bit keys of file paths (BLAKE2b), for ``IndexSet.find_paths``."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                                    "little") for p in paths], dtype=np.uint64)


INDEXES = "indexes"
COMPLETE = ".complete"  # in a downloaded copy of an S3 lake's index: every file of it is there


def index_root(lake: Lake) -> Path:
    """The local folder of the lake's indexes: in the lake; for an S3 lake, its mirror in imgrec's cache."""
    return lake.local_dir(INDEXES)


def current_dir(lake: Lake) -> Path | None:
    """The folder of the lake's current index (for an S3 lake: downloaded into the cache first, once per
    snapshot); None when there is none."""
    if lake.remote:
        return _pull_current(lake)
    try:
        name = (index_root(lake) / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    path = index_root(lake) / name
    return path if (path / "meta.json").is_file() else None


def _pull_current(lake: Lake) -> Path | None:
    """The S3 lake's current index in the local cache: ``indexes/CURRENT`` names it; a copy that has all its
    files (``.complete``) is used as it is, else its files and the thumbnail segments it lists are downloaded
    (``download_folder``)."""
    try:
        name = lake.store.read_bytes(f"{INDEXES}/CURRENT").decode().strip()
    except FileNotFoundError:
        return None
    local = index_root(lake) / name
    if (local / COMPLETE).is_file():
        return local
    prefix = f"{INDEXES}/{name}/"
    entries = [e for e in lake.store.list(f"{INDEXES}/{name}") if e.path.startswith(prefix) and
               e.path[len(prefix):].count("/") <= 1]  # its files, and its shards' (shard-NNN/...)
    if not any(e.path == prefix + "meta.json" for e in entries):
        return None

    def segments(tmp: Path) -> None:
        thumbs = index_root(lake) / "thumbs"
        if (tmp / "thumbs.json").is_file():
            for seg in json.loads((tmp / "thumbs.json").read_text()):
                if not (thumbs / seg).is_file():  # segments are shared by snapshots: each comes down once
                    lake.store.get_file(f"{INDEXES}/thumbs/{seg}", thumbs / seg)

    return download_folder(lake, prefix, [e.path for e in entries], local, then=segments)


def download_folder(lake: Lake, prefix: str, paths: list[str], local: Path,
                    then: Callable[[Path], None] | None = None) -> Path:
    """The S3 lake's files ``paths`` (under ``prefix``) as the local folder ``local``: downloaded into a temporary
    folder beside it (``then`` run on it), marked ``.complete`` and renamed once whole: a reader finds all of it or
    none."""
    import shutil
    import uuid

    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    for path in paths:
        lake.store.get_file(path, tmp / path[len(prefix):])
    if then is not None:
        then(tmp)
    (tmp / COMPLETE).write_text(local.name)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return local


def push_index(lake: Lake, snap: Path, segments: list[str]) -> None:
    """Upload a freshly built index of an S3 lake (its files, the thumbnail segments it added), then its
    ``CURRENT``: searchers see the new index only once it is whole."""
    for f in sorted(snap.rglob("*")):  # its files, and its shards' folders
        if f.is_file() and f.name != COMPLETE:
            lake.store.put_file(_scratch_copy(lake, f), f"{INDEXES}/{snap.name}/{f.relative_to(snap).as_posix()}")
    for seg in segments:
        lake.store.put_file(_scratch_copy(lake, snap.parent / "thumbs" / seg), f"{INDEXES}/thumbs/{seg}")
    lake.store.write_bytes(f"{INDEXES}/CURRENT", snap.name.encode())
    (snap / COMPLETE).write_text(snap.name)


def _scratch_copy(lake: Lake, f: Path) -> Path:
    import shutil
    import uuid

    tmp = lake.store.scratch() / f"{uuid.uuid4().hex}-{f.name}"
    shutil.copyfile(f, tmp)
    return tmp


@dataclass
class IndexSet:
    path: Path
    meta: dict[str, Any]
    ids: NDArray[np.int64]
    embeddings: NDArray[np.float16]
    color: NDArray[np.float32]
    hashes: NDArray[np.uint64]
    _radius: dict[tuple[int, int, int], RadiusIndex | None] = field(default_factory=dict, init=False, repr=False)
    _radius_asks: dict[tuple[int, int, int], int] = field(default_factory=dict, init=False, repr=False)
    _radius_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def snapshot(self) -> int:
        return int(self.meta["snapshot"])

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def open(cls, lake: Lake, *, expect_snapshot: int | None = None) -> IndexSet:
        """Open the current index memory-mapped; StaleIndex if it is missing or not of ``expect_snapshot``."""
        path = current_dir(lake)
        if path is None:
            raise StaleIndex(f"no index in {index_root(lake)}; run: imgrec index --lake {lake.root}")
        meta = json.loads((path / "meta.json").read_text())
        if expect_snapshot is not None and int(meta["snapshot"]) != expect_snapshot:
            raise StaleIndex(f"index covers snapshot {meta['snapshot']}, the lake is at {expect_snapshot}")

        def load(name: str) -> np.ndarray:
            return np.load(path / name, mmap_mode="r") if (path / name).stat().st_size else np.empty(0)

        return cls(path, meta, load("ids.npy"), load("embeddings.npy"), load("color.npy"), load("hashes.npy"))

    @cached_property
    def whitening(self) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
        """(mean, projection) from the model's vectors to the searched ones; None where they are kept as they are."""
        if not (self.path / "whitening.npz").is_file():
            return None
        with np.load(self.path / "whitening.npz") as z:
            return z["mean"], z["projection"]

    def project(self, raw: NDArray[np.floating]) -> NDArray[np.float32]:
        """The model's embedding(s) of query images in the searched space: whitened when the index is, unit norm."""
        from imgrec import similarity as sim

        w = self.whitening
        return sim.apply_whitening(raw, *w) if w is not None else sim.l2_normalize(raw).astype(np.float32)

    @cached_property
    def layout(self) -> NDArray[np.float16] | None:
        """The colour layout vectors as searched (unit norm, float16), memory-mapped; None for an index of a lake
        ingested before the colour layout (its colour measure is the histogram)."""
        f = self.path / "layout.npy"
        return np.load(f, mmap_mode="r") if f.is_file() and self.searcher.has("layout") else None

    @cached_property
    def layout_space(self) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
        """(mean, projection) of the colour layout's PCA; None where the descriptors are kept as they are."""
        if not (self.path / "layout_space.npz").is_file():
            return None
        with np.load(self.path / "layout_space.npz") as z:
            return z["mean"], z["projection"]

    def project_layout(self, raw: NDArray[np.floating]) -> NDArray[np.float32]:
        """Colour layout descriptor(s) of query images in the searched space (unit norm)."""
        from imgrec import similarity as sim

        w = self.layout_space
        return sim.apply_whitening(raw, *w) if w is not None else sim.l2_normalize(raw).astype(np.float32)

    @cached_property
    def metadata(self) -> Any:
        """Per row: image_id, path, collection, relpath, width, height, label (a memory-mapped Arrow table; None
        for an index written before it existed)."""
        if not (self.path / "rows.arrow").is_file():
            return None
        import pyarrow as pa

        return pa.ipc.open_file(pa.memory_map(str(self.path / "rows.arrow"))).read_all()

    @cached_property
    def _thumbs(self) -> tuple[NDArray[np.int64], list[Any]] | None:
        """Per row (segment, offset, length) and the segments, memory-mapped; None for an index without them."""
        if not (self.path / "thumbs.npy").is_file():
            return None
        store = self.path.parent / "thumbs"
        segments = [np.memmap(store / name, dtype=np.uint8, mode="r") if (store / name).stat().st_size else
                    np.empty(0, np.uint8) for name in json.loads((self.path / "thumbs.json").read_text())]
        return np.load(self.path / "thumbs.npy", mmap_mode="r"), segments

    def thumbnails(self, image_ids: list[int]) -> dict[int, bytes] | None:
        """The thumbnails of the ids of this snapshot that have one (JPEG bytes); None without a thumbnail store."""
        store = self._thumbs
        if store is None:
            return None
        locs, segments = store
        ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(self.size - 1, 0))
        out = {}
        for image_id, p in zip(ids.tolist(), pos.tolist(), strict=True):
            if self.size and self.ids[p] == image_id:
                seg, off, length = (int(v) for v in locs[p])
                if length >= 0:
                    out[image_id] = segments[seg][off : off + length].tobytes()
        return out

    @cached_property
    def _path_table(self) -> tuple[NDArray[np.uint64], NDArray[np.int64]] | None:
        if not (self.path / "path_keys.npy").is_file():
            return None
        return np.load(self.path / "path_keys.npy", mmap_mode="r"), np.load(self.path / "path_rows.npy", mmap_mode="r")

    def find_paths(self, paths: list[str]) -> dict[str, dict[str, Any]] | None:
        """For each path that is an image of this snapshot: its row's image_id, size_bytes and mtime_ns (from the
        index, no DuckDB); None for an index written before it had the path table."""
        table, meta = self._path_table, self.metadata
        if table is None or meta is None or "mtime_ns" not in meta.column_names:
            return None
        keys, rows = table
        out = {}
        for path, key in zip(paths, path_keys(paths), strict=True):
            lo = int(np.searchsorted(keys, key))
            while lo < len(keys) and keys[lo] == key:  # a 64-bit key collision is checked on the path itself
                row = int(rows[lo])
                if meta.column("path")[row].as_py() == path:
                    out[path] = {"row": row, **{c: meta.column(c)[row].as_py()
                                                for c in ("image_id", "size_bytes", "mtime_ns")}}
                    break
                lo += 1
        return out

    @cached_property
    def hash_columns(self) -> NDArray[np.uint64]:
        """The hashes in column-major order (a copy in memory): a scan reads each 64-bit word contiguously, twice
        as fast as through the row-major file."""
        return np.asfortranarray(self.hashes)

    @cached_property
    def searcher(self) -> Searcher:
        """Where the graph searches run: this folder's graphs, or its shards (``imgrec.searchers``)."""
        from imgrec.searchers import open_searcher

        return open_searcher(self.path)

    def use(self, searcher: Searcher) -> None:
        """Search the graphs through ``searcher`` instead of this folder's own (the shards served by Ray actors,
        ``imgrec.shard_actors.RayShards``)."""
        self.__dict__["searcher"] = searcher

    def knn(self, graph: str, X: NDArray[np.floating], count: int, ef: int, threads: int) -> list[NDArray[np.int64]]:
        """Per row of ``X``, the rows of its ``count`` nearest images in ``graph`` (best first)."""
        hits = self.searcher.knn(graph, np.asarray(X, dtype=np.float32), count, ef, threads)
        return [self.rows(k) for k in hits.lists()]

    def radius_index(self, cols: slice, radius: int, *, now: bool = False, wait: bool = False
                     ) -> RadiusIndex | None:
        """The multi-index hashing table of the hash words ``cols`` for radius queries (``imgrec.mih``), or None
        where a scan is to be used: lakes under RADIUS_INDEX_MIN images, and until the table is built. It is built
        in a background thread once asked for RADIUS_INDEX_AFTER times (``now``: at once), so that a one-off search
        (the CLI) never pays for it (0.5 s at 400,000 images) and a serving process soon has it. ``wait``: build it
        in this thread if it is not there (the benchmark measures a warm engine)."""
        if self.size < RADIUS_INDEX_MIN:
            return None
        from imgrec.mih import RadiusIndex

        key = (cols.start, cols.stop, int(radius))
        with self._radius_lock:
            if key in self._radius and (self._radius[key] is not None or not wait):
                return self._radius[key]  # built, or being built (None)
            self._radius_asks[key] = self._radius_asks.get(key, 0) + 1
            if self._radius_asks[key] < RADIUS_INDEX_AFTER and not (now or wait):
                return None
            self._radius[key] = None

        def build() -> RadiusIndex:
            table = RadiusIndex.build(np.asarray(self.hashes)[:, cols], radius)
            with self._radius_lock:
                self._radius[key] = table
            return table

        if wait:
            return build()
        threading.Thread(target=build, name="imgrec-radius-index", daemon=True).start()
        return None

    def rows(self, image_ids: NDArray[np.int64] | list[int]) -> NDArray[np.int64]:
        """Row positions of image ids (KeyError for ids not in this snapshot)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, max(self.size - 1, 0))
        ok = (self.size > 0) & (self.ids[pos] == ids) if self.size else np.zeros(ids.shape, bool)
        if not np.all(ok):
            raise KeyError(f"image ids not in the index: {ids[~ok].tolist()[:10]}")
        return pos.astype(np.int64)
