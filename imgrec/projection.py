"""The map of the collection: reading and writing ``<lake>/projections/``, and pure metrics of a map.

Layout (outside ``tables/``, so neither a new snapshot nor the lake's garbage collector touches it)::

    <lake>/projections/projections.parquet    one row per (map, image): image_id, features, method, dims, x, y, z
                                              (null in 2D), cluster; the parameters, timings, lake snapshot and
                                              cluster summaries of every map in the schema's key-value metadata
                                              (key ``imgrec``), so data and description change together
    <lake>/projections/models/<map>.joblib    the fitted PCA, reducer and k-means of a map (``transform`` of new ids)
    <lake>/projections/evaluation.json        neighbour preservation and silhouette on labelled sets

Every file is written under a temporary name, fsynced and renamed: a reader sees the old file or the new one.
Only numpy and pyarrow are imported here (no sklearn, no umap).
"""

from __future__ import annotations

import colorsys
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

FEATURES = ("embedding", "color")
METHODS = ("umap", "tsne", "pca")
META_KEY = b"imgrec"
TABLE_NAME = "projections.parquet"
EVALUATION_NAME = "evaluation.json"
SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("features", pa.string()), ("method", pa.string()), ("dims", pa.int8()),
    ("x", pa.float32()), ("y", pa.float32()), ("z", pa.float32()), ("cluster", pa.int32()),
])


def map_key(features: str, method: str, dims: int) -> str:
    """The name of one map, e.g. ``embedding-umap-2d``."""
    return f"{features}-{method}-{int(dims)}d"


def projections_dir(lake: str | os.PathLike[str]) -> Path:
    """The lake's ``projections`` folder (for an S3 lake: its mirror in the cache, see ``sync``)."""
    from imgrec.lake import Lake

    return Lake(lake).local_dir("projections")


def publish(lake: str | os.PathLike[str], path: Path) -> None:
    """An S3 lake: upload a projections file just written beside the lake (nothing to do on disk)."""
    from imgrec.lake import Lake

    Lake(lake).push(path)


def fetch(lake: str | os.PathLike[str], path: Path) -> bool:
    """An S3 lake: download one of its projections files into the mirror; whether it is there."""
    from imgrec.lake import Lake

    where = Lake(lake)
    if where.remote:
        try:
            where.pull(path.relative_to(where.local_dir("")).as_posix())
        except FileNotFoundError:
            return False
    return path.is_file()


def table_path(lake: str | os.PathLike[str]) -> Path:
    return projections_dir(lake) / TABLE_NAME


def model_path(lake: str | os.PathLike[str], key: str) -> Path:
    return projections_dir(lake) / "models" / f"{key}.joblib"


def evaluation_path(lake: str | os.PathLike[str]) -> Path:
    return projections_dir(lake) / EVALUATION_NAME


# --- atomic files -------------------------------------------------------------------------------------------------


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path``, fsync the folder."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    from imgrec.lake import fsync_dir

    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1))
    atomic_replace(tmp, path)


def write_model(path: Path, model: Any) -> None:
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    joblib.dump(model, tmp)
    atomic_replace(tmp, path)


def read_model(path: Path) -> Any:
    import joblib

    return joblib.load(path)


# --- the projections table ----------------------------------------------------------------------------------------


@dataclass
class Maps:
    """Every stored map of a lake: the rows (Arrow) and, per map key, its description."""

    table: pa.Table
    meta: dict[str, dict[str, Any]]

    @property
    def keys(self) -> list[str]:
        return sorted(self.meta)

    def coords(self, key: str) -> dict[str, NDArray[Any]]:
        """``image_id``, ``x``, ``y``, ``z`` (NaN in 2D) and ``cluster`` of one map, as numpy arrays."""
        m = self.meta[key]
        t = self.table
        mask = pc.and_(
            pc.and_(pc.equal(t["features"], m["features"]), pc.equal(t["method"], m["method"])),
            pc.equal(t["dims"], m["dims"]))
        sub = t.filter(mask)
        out = {c: sub[c].to_numpy(zero_copy_only=False) for c in ("image_id", "x", "y", "z", "cluster")}
        out["z"] = np.asarray(out["z"], dtype=np.float32)  # nulls -> NaN
        return out


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def read_maps(lake: str | os.PathLike[str]) -> Maps | None:
    """The stored maps, or None when there are none (a leftover temporary file is never read)."""
    path = table_path(lake)
    if not fetch(lake, path):
        return None
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    return Maps(table.select(SCHEMA.names).cast(SCHEMA), meta.get("maps", {}))


def read_meta(lake: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Only the descriptions of the stored maps (reads the Parquet footer, not the rows)."""
    path = table_path(lake)
    if not fetch(lake, path):
        return {}
    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw).get("maps", {}) if raw else {}


def map_rows(features: str, method: str, dims: int, ids: NDArray[np.int64], coords: NDArray[np.floating],
             clusters: NDArray[np.integer]) -> pa.Table:
    """The rows of one map (``coords`` is N x dims)."""
    n = len(ids)
    z = pa.array(coords[:, 2], pa.float32()) if dims == 3 else pa.nulls(n, pa.float32())
    return pa.table({
        "image_id": pa.array(ids, pa.int64()), "features": pa.array([features] * n, pa.string()),
        "method": pa.array([method] * n, pa.string()), "dims": pa.array(np.full(n, dims, np.int8), pa.int8()),
        "x": pa.array(coords[:, 0], pa.float32()), "y": pa.array(coords[:, 1], pa.float32()), "z": z,
        "cluster": pa.array(clusters, pa.int32()),
    }, schema=SCHEMA)


def replace_map(lake: str | os.PathLike[str], key: str, rows: pa.Table, meta: dict[str, Any]) -> Path:
    """Write the table with the rows and description of map ``key`` replaced, atomically."""
    current = read_maps(lake)
    table, maps = (current.table, dict(current.meta)) if current else (empty_table(), {})
    old = maps.get(key)
    if old is not None:
        keep = pc.invert(pc.and_(
            pc.and_(pc.equal(table["features"], old["features"]),
                            pc.equal(table["method"], old["method"])),
            pc.equal(table["dims"], old["dims"])))
        table = table.filter(keep)
    maps[key] = meta
    table = pa.concat_tables([table, rows.cast(SCHEMA)])
    table = table.replace_schema_metadata({META_KEY: json.dumps({"maps": maps}).encode()})
    path = table_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd", row_group_size=65536)
    atomic_replace(tmp, path)
    publish(lake, path)
    return path


# --- pure metrics ---------------------------------------------------------------------------------------------------


def _sqdist(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn(x: NDArray[np.floating], k: int, queries: NDArray[np.int64] | None = None, batch: int = 1024
        ) -> NDArray[np.int64]:
    """The ``k`` nearest rows (Euclidean, exact, self excluded) of each query row of ``x`` (default: every row)."""
    x = np.asarray(x, np.float64)
    rows = np.arange(len(x)) if queries is None else np.asarray(queries, np.int64)
    k = min(k, len(x) - 1)
    out = np.empty((len(rows), k), np.int64)
    for s in range(0, len(rows), batch):
        q = rows[s:s + batch]
        d = _sqdist(x[q], x)
        d[np.arange(len(q)), q] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        out[s:s + batch] = np.take_along_axis(part, order, 1)
    return out


def neighbour_preservation(high: NDArray[np.floating], low: NDArray[np.floating], k: int = 10,
                           queries: NDArray[np.int64] | None = None) -> float:
    """Mean share of each point's ``k`` nearest neighbours in ``high`` that are also among its ``k`` nearest in
    ``low`` (1: every neighbourhood kept; about k/N: a random map)."""
    a, b = knn(high, k, queries), knn(low, k, queries)
    kept = [len(np.intersect1d(ra, rb, assume_unique=True)) for ra, rb in zip(a, b, strict=True)]
    return float(np.mean(kept) / a.shape[1])


def silhouette(x: NDArray[np.floating], labels: NDArray[Any], batch: int = 1024) -> float:
    """Mean silhouette (Euclidean) of the labelled classes: near 1 tight and apart, 0 overlapping, < 0 mixed."""
    x = np.asarray(x, np.float64)
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    n_cls = int(lab.max()) + 1 if len(lab) else 0
    if n_cls < 2:
        raise ValueError("a silhouette needs at least 2 classes")
    onehot = np.zeros((len(x), n_cls))
    onehot[np.arange(len(x)), lab] = 1.0
    sizes = onehot.sum(0)
    scores = np.empty(len(x))
    for s in range(0, len(x), batch):
        d = np.sqrt(_sqdist(x[s:s + batch], x))
        sums = d @ onehot  # distance sums to every class
        own = lab[s:s + batch]
        rows = np.arange(len(own))
        a = sums[rows, own] / np.maximum(sizes[own] - 1, 1)
        mean_other = sums / sizes[None, :]
        mean_other[rows, own] = np.inf
        b = mean_other.min(1)
        sc = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        sc[sizes[own] <= 1] = 0.0
        scores[s:s + batch] = sc
    return float(scores.mean())


# --- colours --------------------------------------------------------------------------------------------------------


def bin_rgb(bins: tuple[int, int, int] = (8, 4, 4)) -> NDArray[np.float64]:
    """The RGB colour (0..1) of the centre of every HSV bin, in the histogram's (hue, saturation, value) order."""
    nh, ns, nv = bins
    return np.array([colorsys.hsv_to_rgb((h + 0.5) / nh, (s + 0.5) / ns, (v + 0.5) / nv)
                     for h in range(nh) for s in range(ns) for v in range(nv)])


def mean_rgb(hists: NDArray[np.floating], bins: tuple[int, int, int] = (8, 4, 4)) -> NDArray[np.uint8]:
    """Each image's mean colour (0..255), from its HSV histogram weighted over the bins' centre colours."""
    h = np.asarray(hists, np.float64)
    h = h / np.maximum(h.sum(1, keepdims=True), 1e-12)
    return np.clip(np.rint(h @ bin_rgb(bins) * 255.0), 0, 255).astype(np.uint8)


def hex_colors(rgb: NDArray[np.integer]) -> list[str]:
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in np.asarray(rgb, np.int64)]


def density(x: NDArray[np.floating], y: NDArray[np.floating], bins: int = 80,
            extent: tuple[float, float, float, float] | None = None) -> list[dict[str, float]]:
    """A 2D histogram of the points as rows (x0, x1, y0, y1, count) of the non-empty cells."""
    if extent is None:
        extent = (float(np.min(x)), float(np.max(x)), float(np.min(y)), float(np.max(y)))
    x0, x1, y0, y1 = extent
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    counts, xe, ye = np.histogram2d(x, y, bins=bins, range=[[x0, x1], [y0, y1]])
    i, j = np.nonzero(counts)
    return [{"x0": float(xe[a]), "x1": float(xe[a + 1]), "y0": float(ye[b]), "y1": float(ye[b + 1]),
             "count": int(counts[a, b])} for a, b in zip(i, j, strict=True)]
