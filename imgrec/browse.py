"""Browsing the lake for the app: folders, images of a folder, file-name search, labels, one image's details.

Everything here reads the engine's pinned snapshot through DuckDB (and its memory-mapped index for colours); no
streamlit import, so the functions are testable on their own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from imgrec.catalog import dicts as _dicts

if TYPE_CHECKING:
    from imgrec.search import Engine


def folders(engine: Engine) -> list[dict[str, Any]]:
    """Every folder that holds images, per collection, with its image count (``folder`` '' is the root)."""
    return _dicts(engine.cursor().execute(
        "SELECT collection, folder, count(*) AS images FROM images GROUP BY ALL ORDER BY collection, folder"))


def images_in(engine: Engine, collection: str, folder: str, offset: int = 0, limit: int = 24
              ) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page of images) of one folder, by file name; sub-folders are not included."""
    cur = engine.cursor()
    total = int(cur.execute("SELECT count(*) FROM images WHERE collection = ? AND folder = ?",
                            [collection, folder]).fetchone()[0])
    rows = _dicts(cur.execute(
        "SELECT i.image_id, i.path, i.relpath, l.label FROM images i LEFT JOIN labels l USING (image_id) "
        "WHERE collection = ? AND folder = ? ORDER BY relpath LIMIT ? OFFSET ?",
        [collection, folder, int(limit), int(offset)]))
    return total, rows


def find_by_name(engine: Engine, text: str, limit: int = 48) -> list[dict[str, Any]]:
    """Images whose path within the collection contains ``text`` (case-insensitive, literal: % and _ match only
    themselves), shortest paths first."""
    text = text.strip()
    if not text:
        return []
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return _dicts(engine.cursor().execute(
        "SELECT i.image_id, i.path, i.relpath, l.label FROM images i LEFT JOIN labels l USING (image_id) "
        "WHERE i.relpath ILIKE ? ESCAPE '\\' ORDER BY length(i.relpath), i.relpath LIMIT ?",
        [pattern, int(limit)]))


def label_counts(engine: Engine, limit: int = 300) -> list[tuple[str, int]]:
    """Predicted top labels with their image counts, most frequent first."""
    rows = engine.cursor().execute(
        "SELECT l.label, count(*) AS n FROM labels l JOIN images i USING (image_id) WHERE l.label IS NOT NULL "
        "GROUP BY l.label ORDER BY n DESC, l.label LIMIT ?", [int(limit)]).fetchall()
    return [(str(label), int(n)) for label, n in rows]


def details(engine: Engine, image_id: int) -> dict[str, Any]:
    """One image's metadata row, its top-5 labels with probabilities, and its colour histogram (KeyError if the
    image is not in the lake)."""
    import numpy as np

    rows = _dicts(engine.cursor().execute(
        "SELECT i.*, l.labels, l.probs FROM images i LEFT JOIN labels l USING (image_id) WHERE i.image_id = ?",
        [int(image_id)]))
    if not rows:
        raise KeyError(image_id)
    out = rows[0]
    idx = engine.index
    if idx is not None:
        try:
            out["hist"] = np.asarray(idx.color[int(idx.rows([int(image_id)])[0])], dtype=np.float32)
        except KeyError:
            out["hist"] = None
    return out


def inside_collection(engine: Engine, path: str, collection: str) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside the registered root of ``collection``; for an S3 root,
    whether the object's key is below the root's prefix with no '.', '..' or empty segment."""
    row = engine.cursor().execute("SELECT root FROM collections WHERE collection = ?", [collection]).fetchone()
    if row is None:
        return False
    if str(row[0]).startswith("s3://"):
        rel = path.removeprefix(str(row[0]).rstrip("/") + "/")
        return rel != path and not any(p in ("", ".", "..") for p in rel.split("/"))
    root = os.path.realpath(row[0])
    real = os.path.realpath(path)
    return os.path.commonpath([root, real]) == root


def image_file(engine: Engine, image_id: int) -> tuple[bytes, dict[str, Any]]:
    """The bytes of ``image_id``'s file and its metadata row, read only from inside its collection's registered root
    (a folder, or an S3 prefix read through the same storage layer as the lake).

    Raises KeyError (unknown id), PermissionError (outside the root) or OSError / ImageError (gone or unreadable
    since ingestion).
    """
    from imgrec.imaging import ImageError, read_file

    meta = engine.lookup_ids([int(image_id)]).get(int(image_id))
    if meta is None:
        raise KeyError(image_id)
    if not inside_collection(engine, meta["path"], meta["collection"]):
        raise PermissionError(f"{meta['path']} is outside the collection's folder")
    root = engine.cursor().execute("SELECT root FROM collections WHERE collection = ?",
                                   [meta["collection"]]).fetchone()[0]
    if str(root).startswith("s3://"):
        from imgrec.storage import open_store

        store = open_store(root)
        data = store.read_bytes(meta["relpath"])
        if len(data) > engine.config.max_file_bytes:
            raise ImageError("file too large", "too_large")
        return data, meta
    # checked again on the file actually opened (a symlink swapped in after the check above is refused too);
    # a FIFO put in the file's place is not waited on
    data, _ = read_file(meta["path"], engine.config.max_file_bytes, inside=os.path.realpath(root))
    return data, meta


def full_image(engine: Engine, image_id: int, max_side: int = 1280) -> bytes:
    """The image file of ``image_id`` as a JPEG of at most ``max_side`` px (orientation applied); read as
    ``image_file`` reads it (only inside the collection's root)."""
    from imgrec.imaging import decode, thumbnail_jpeg

    data, _ = image_file(engine, image_id)
    decoded = decode(data, max_pixels=engine.config.max_pixels, min_side=max_side)
    return thumbnail_jpeg(decoded.image, max_side, quality=88)
