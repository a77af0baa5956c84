"""Features added to imgrec after a lake was ingested, computed for the images that lack them.

The colour layout (``imgrec.features.color.layout_descriptor``) came after the first lakes: their images have a
histogram but no layout, so the index keeps the histogram as the colour measure. ``backfill_layout`` (run by every
``imgrec ingest``) reads those images again (their files; where a file is gone or unreadable, the stored thumbnail)
and commits their layouts in chunks, so an interrupted run keeps what it did and the next one goes on from there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from imgrec.config import Config
from imgrec.lake import Lake

CHUNK = 4096  # images per commit


def _layout_of(data: bytes, min_side: int | None) -> np.ndarray:
    from imgrec.features.color import layout_descriptor
    from imgrec.features.extract import pyramid
    from imgrec.imaging import decode

    return layout_descriptor(pyramid(decode(data, min_side=min_side).image, None).color)


def _read(path: str, max_bytes: int) -> bytes:
    if path.startswith("s3://"):
        from imgrec.storage import open_store

        bucket, _, rel = path.removeprefix("s3://").partition("/")
        return open_store(f"s3://{bucket}").read_bytes(rel)
    from imgrec.imaging import read_file

    return read_file(path, max_bytes)[0]


def backfill_layout(config: Config, *, progress: bool = False, log: Callable[[str], None] = lambda s: None,
                    stop: threading.Event | None = None) -> int:
    """Compute and commit the colour layout of every image of the lake that has none; how many were added."""
    from tqdm.auto import tqdm

    from imgrec.features.embed import spec
    from imgrec.features.extract import decode_side

    lake = Lake(config.lake)
    manifest = lake.manifest()
    if manifest is None:
        return 0
    conn = lake.connect(manifest)
    try:
        todo = conn.sql("SELECT i.image_id, i.path FROM images i WHERE NOT EXISTS "
                        "(SELECT 1 FROM color_layout c WHERE c.image_id = i.image_id) ORDER BY i.image_id")
    finally:
        conn.close()
    if not todo:
        return 0
    log(f"imgrec: {len(todo):,} images have no colour layout yet (ingested by an earlier imgrec): computing it")
    side = decode_side(spec(manifest.model["name"]))
    t0, added = time.perf_counter(), 0

    def one(row: tuple[int, str]) -> tuple[int, np.ndarray | None]:
        try:
            return row[0], _layout_of(_read(row[1], config.max_file_bytes), side)
        except Exception:  # gone, changed or unreadable: from the thumbnail below
            return row[0], None

    bar = tqdm(total=len(todo), unit="img", desc="colour layout", disable=not progress)
    with ThreadPoolExecutor(max(1, config.workers)) as pool:  # Pillow and numpy release the GIL
        for s in range(0, len(todo), CHUNK):
            if stop is not None and stop.is_set():
                break
            done = list(pool.map(one, todo[s : s + CHUNK]))
            missing = [i for i, d in done if d is None]
            from_thumbs = _from_thumbnails(lake, missing) if missing else {}
            rows = [(i, d if d is not None else from_thumbs.get(i)) for i, d in done]
            rows = [(i, d) for i, d in rows if d is not None]
            if rows:
                _commit(lake, rows)
                added += len(rows)
            bar.update(len(done))
    bar.close()
    log(f"imgrec: colour layout of {added:,} images added in {time.perf_counter() - t0:.1f}s")
    return added


def _from_thumbnails(lake: Lake, ids: list[int]) -> dict[int, np.ndarray]:
    import pyarrow as pa

    conn = lake.connect()
    try:
        cur = conn.cursor()
        cur.register("wanted", pa.table({"image_id": pa.array(ids, pa.int64())}))
        rows = cur.execute("SELECT t.image_id, t.thumb FROM thumbnails t JOIN wanted USING (image_id)").fetchall()
    finally:
        conn.close()
    out = {}
    for image_id, blob in rows:
        try:
            out[int(image_id)] = _layout_of(bytes(blob), None)
        except Exception:
            continue
    return out


def _commit(lake: Lake, rows: list[tuple[int, Any]]) -> None:
    import polars as pl

    with lake.writer() as w:
        w.commit({"color_layout": pl.DataFrame({"image_id": np.array([i for i, _ in rows], dtype=np.int64),
                                                "vector": np.stack([d for _, d in rows]).astype(np.float32)})})
