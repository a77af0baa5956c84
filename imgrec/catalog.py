"""The lake's metadata as a search needs it: the rows a filter allows, the ids of files of the lake, the metadata and
thumbnails of results. From the index's memory-mapped tables where it has them (no query), else through DuckDB:
``cursor`` is called only then, so a search answered from the index never opens DuckDB."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from imgrec.index import IndexSet
    from imgrec.query import Result

Cursor = Callable[[], Any]  # a DuckDB cursor over the served snapshot, opened on demand

META_COLUMNS = ("image_id", "path", "collection", "relpath", "width", "height", "label")


def dicts(cur: Any) -> list[dict[str, Any]]:
    """The rows of an executed DuckDB cursor as dicts keyed by column name."""
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def select_rows(cursor: Cursor, idx: IndexSet, collections: Sequence[str] | None, folders: Sequence[str] | None,
                labels: Sequence[str] | None) -> NDArray[np.int64]:
    """Rows of the index passing the metadata filters (collections, folders with their sub-folders, labels)."""
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
    ids = cursor().execute(f"SELECT image_id FROM images WHERE {' AND '.join(where)}", params).fetchnumpy()
    found = np.asarray(ids["image_id"], dtype=np.int64)
    found = found[np.isin(found, idx.ids)]
    return idx.rows(np.sort(found)) if found.size else np.empty(0, np.int64)


def lookup_paths(cursor: Cursor, idx: IndexSet | None, paths: Sequence[str]) -> dict[str, int]:
    """image_id of each path that is an image of the lake whose file is unchanged (same size and mtime)."""
    found = idx.find_paths(list(paths)) if idx is not None else None
    if found is None:  # an index without its path table (or none): DuckDB
        found = {path: {"image_id": image_id, "size_bytes": size, "mtime_ns": mtime_ns}
                 for path, image_id, size, mtime_ns in cursor().execute(
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


def lookup_ids(cursor: Cursor, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Metadata rows (with the top label) of images of the lake by id (DuckDB)."""
    if not image_ids:
        return {}
    rows = dicts(cursor().execute(
        "SELECT i.*, l.label FROM images i LEFT JOIN labels l USING (image_id) "
        "WHERE i.image_id IN (SELECT unnest(?))", [[int(i) for i in image_ids]]))
    return {int(r["image_id"]): r for r in rows}


def ids_with_hashes(cursor: Cursor, hashes: list[str]) -> set[int]:
    """Ids of the images whose bytes have one of these content hashes."""
    if not hashes:
        return set()
    rows = cursor().execute(
        f"SELECT image_id FROM images WHERE content_hash IN ({', '.join('?' * len(hashes))})", hashes).fetchall()
    return {int(r[0]) for r in rows}


def attach_metadata(cursor: Cursor, results: list[Result], idx: IndexSet, rows: NDArray[np.int64]) -> None:
    """Each result's path, collection, size and label: from the index's row table, else from DuckDB."""
    table = idx.metadata
    if table is not None:  # value by value: Table.take would import pyarrow.compute (80 ms) in a fresh process
        cols = {c: table.column(c) for c in META_COLUMNS}
        meta = {}
        for r in rows.tolist():
            m = {c: col[r].as_py() for c, col in cols.items()}
            meta[int(m["image_id"])] = m
    else:
        meta = lookup_ids(cursor, [r.image_id for r in results])
    for res in results:
        m = meta.get(res.image_id)
        if m:
            res.path, res.collection, res.relpath, res.width, res.height, res.label = (
                m["path"], m["collection"], m["relpath"], m["width"], m["height"], m["label"])


def thumbnails(cursor: Cursor, idx: IndexSet | None, image_ids: Sequence[int]) -> dict[int, bytes]:
    """JPEG thumbnails by image id: from the index's memory-mapped store, else (an older index, an id of another
    snapshot) from the lake's table through DuckDB."""
    if not image_ids:
        return {}
    out = idx.thumbnails(list(image_ids)) if idx is not None else None
    missing = [int(i) for i in image_ids if out is None or int(i) not in out]
    out = out or {}
    if missing:
        rows = cursor().execute(
            "SELECT image_id, thumb FROM thumbnails WHERE image_id IN (SELECT unnest(?))", [missing]).fetchall()
        out.update({int(i): bytes(t) for i, t in rows if t is not None})
    return out


def sample(cursor: Cursor, n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """A random sample of images (id, path, relpath, label) to browse."""
    return dicts(cursor().execute(
        "SELECT i.image_id, i.path, i.relpath, l.label FROM images i LEFT JOIN labels l USING (image_id) "
        f"USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)})"))
