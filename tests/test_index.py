"""What the index holds beside the search structures: the thumbnail store (segments shared by the snapshots'
indexes, appended to by incremental builds, rewritten once half garbage) and the path table (a query's path found
without DuckDB)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ingest_quietly, make_collection

from imgrec.config import Config
from imgrec.index import IndexSet, current_dir
from imgrec.lake import Lake
from imgrec.search import Engine


def _lake_thumbs(lake: Path) -> dict[int, bytes]:
    conn = Lake(lake).connect()
    try:
        return {int(i): bytes(t) for i, t in conn.sql(
            "SELECT image_id, thumb FROM thumbnails WHERE image_id IN (SELECT image_id FROM images)")}
    finally:
        conn.close()


def _segments(lake: Path) -> list[str]:
    return json.loads((current_dir(Lake(lake)) / "thumbs.json").read_text())


def test_thumbnails_from_the_store_equal_the_lakes_through_incremental_builds(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 8)
    ingest_quietly(root, lake)
    idx = IndexSet.open(Lake(lake))
    assert idx.thumbnails(idx.ids.tolist()) == _lake_thumbs(lake) and len(_segments(lake)) == 1
    first = _segments(lake)[0]
    make_collection(root, 3, start=8)  # new images: one more segment, the first one kept as it was
    ingest_quietly(root, lake)
    idx = IndexSet.open(Lake(lake))
    assert _segments(lake)[0] == first and len(_segments(lake)) == 2
    assert idx.thumbnails(idx.ids.tolist()) == _lake_thumbs(lake) and len(_lake_thumbs(lake)) == 11
    store = lake / "indexes" / "thumbs"
    for p in sorted(root.rglob("img_00[0-6].*")):  # 7 of 11 removed: more than half of the bytes are garbage
        p.unlink()
    ingest_quietly(root, lake)
    idx = IndexSet.open(Lake(lake))
    assert len(_segments(lake)) == 1 and first not in _segments(lake)  # rewritten
    assert idx.thumbnails(idx.ids.tolist()) == _lake_thumbs(lake) and len(_lake_thumbs(lake)) == 4
    used = {n for snap in (lake / "indexes").glob("snap-*") for n in json.loads((snap / "thumbs.json").read_text())}
    assert {p.name for p in store.glob("*.bin")} == used  # those of the current and the previous index only
    assert idx.thumbnails([10_000]) == {}  # an id that is not there


def test_engine_falls_back_to_the_lake_without_a_store(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 5)
    ingest_quietly(root, lake)
    snap = current_dir(Lake(lake))
    for name in ("thumbs.npy", "thumbs.json", "path_keys.npy", "path_rows.npy"):  # an index of an older imgrec
        (snap / name).unlink()
    shutil.rmtree(lake / "indexes" / "thumbs")
    engine = Engine(Config.load(lake))
    assert engine.index.thumbnails([0]) is None and engine.index.find_paths(["/x"]) is None
    assert engine.thumbnails([0, 1, 2]) == {i: t for i, t in _lake_thumbs(lake).items() if i < 3}
    path = engine.index.metadata.column("path")[2].as_py()
    assert engine.lookup_paths([path]) == {path: 2}  # through DuckDB


def test_path_table_finds_unchanged_files_only(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    paths = make_collection(root, 6)
    ingest_quietly(root, lake)
    engine = Engine(Config.load(lake))
    found = engine.index.find_paths([str(p) for p in paths] + [str(root / "nope.jpg")])
    assert sorted(r["image_id"] for r in found.values()) == list(range(6)) and str(root / "nope.jpg") not in found
    assert engine._conn is None
    expected = {p: i for p, i in engine.cursor().execute("SELECT path, image_id FROM images").fetchall()}
    engine.close()
    engine = Engine(Config.load(lake))
    assert engine.lookup_paths([str(paths[1])]) == {str(paths[1]): expected[str(paths[1])]}
    paths[1].write_bytes(paths[1].read_bytes() + b"\0")  # changed since ingestion: decoded again, not looked up
    assert engine.lookup_paths([str(paths[1])]) == {}
    assert engine._conn is None  # none of it needed DuckDB


@pytest.mark.parametrize("force", [False, True])
def test_a_rebuild_keeps_the_store_whole(tmp_path: Path, force: bool) -> None:
    from pipelines.index import build_indexes

    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 4)
    ingest_quietly(root, lake)
    build_indexes(Config.load(lake), force=force)
    idx = IndexSet.open(Lake(lake))
    assert idx.thumbnails(idx.ids.tolist()) == _lake_thumbs(lake)
    assert {p.name for p in (lake / "indexes" / "thumbs").glob("*.bin")} >= set(_segments(lake))
