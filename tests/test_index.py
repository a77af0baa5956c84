"""What the index holds beside the search structures: the thumbnail store (segments shared by the snapshots'
indexes, appended to by incremental builds, rewritten once half garbage) and the path table (a query's path found
without DuckDB)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
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


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 64))
    return (centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, 64))).astype(np.float32)


def _never_found(index: Any, vectors: np.ndarray, ids: np.ndarray) -> set[int]:
    """The images no search returns: every image searched for with a breadth over the whole graph."""
    index.expansion_search = len(ids)
    keys = np.asarray(index.search(vectors, 16, threads=2).keys)
    return set(ids.tolist()) - set(keys[keys < 2**63].tolist())


def test_every_image_of_a_graph_built_on_threads_is_found() -> None:
    """usearch's concurrent add leaves some nodes no search reaches (two threads, 240 clustered vectors: most
    builds); the build adds those again, so that every image, built or added by an update, can be found."""
    from usearch.index import Index

    from pipelines.index import _hnsw

    config = Config.load("unused")
    vectors, ids = _clustered(320, 0), np.arange(320, dtype=np.int64) * 7 + 3
    for trial in range(8):
        index, reused, relinked = _hnsw(Index, None, None, {}, "layout", ids[:240], vectors[:240], "cos", "f16",
                                        config, 2)
        assert not reused and 0 <= relinked < 24
        assert index.expansion_search == config.hnsw_expansion_search
        assert _never_found(index, vectors[:240], ids[:240]) == set(), trial


def test_an_updated_graph_finds_every_image(tmp_path: Path) -> None:
    from usearch.index import Index

    from pipelines.index import _hnsw

    config = Config.load("unused")
    vectors, ids = _clustered(480, 1), np.arange(480, dtype=np.int64) * 5 + 1
    prev = tmp_path / "prev"
    prev.mkdir()
    for trial in range(4):
        first, _, _ = _hnsw(Index, None, None, {}, "layout", ids[:240], vectors[:240], "cos", "f16", config, 2)
        first.save(str(prev / "layout.usearch"))
        np.save(prev / "ids.npy", ids[:240])
        keep = np.r_[np.arange(10, 240), np.arange(240, 400)]  # ten gone, 160 new
        index, reused, _ = _hnsw(Index, prev, {"model": {}}, {}, "layout", ids[keep], vectors[keep], "cos", "f16",
                                 config, 2)
        assert reused and len(index) == keep.size
        assert _never_found(index, vectors[keep], ids[keep]) == set(), trial


def test_the_index_meta_says_how_many_images_were_relinked(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 4)
    ingest_quietly(root, lake)
    meta = json.loads((current_dir(Lake(lake)) / "meta.json").read_text())
    assert set(meta["hnsw"]["relinked"]) >= {"embedding", "color"}
    assert all(isinstance(n, int) and n >= 0 for n in meta["hnsw"]["relinked"].values())
