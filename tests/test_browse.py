"""The lake browsing behind the Search page: folders, file-name search, labels, details, the full image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ingest_quietly, make_collection, save, synthetic_image

from imgrec import browse
from imgrec.config import Config
from imgrec.search import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp("photos")
    make_collection(root, 6)
    save(synthetic_image(50), root / "odd names" / "100%_sure_a.jpg")
    save(synthetic_image(51), root / "odd names" / "100x_sure.jpg")
    lake = tmp_path_factory.mktemp("lake")
    ingest_quietly(root, lake)
    return Engine(Config.load(lake))


def test_folders_and_their_images(engine: Engine) -> None:
    folders = browse.folders(engine)
    assert [(f["folder"], f["images"]) for f in folders] == [("a", 3), ("b/deeper", 3), ("odd names", 2)]
    total, rows = browse.images_in(engine, folders[0]["collection"], "a", offset=1, limit=1)
    assert total == 3 and [r["relpath"] for r in rows] == ["a/img_002.webp"]
    assert browse.images_in(engine, folders[0]["collection"], "nowhere")[0] == 0


def test_find_by_name_is_literal_and_case_insensitive(engine: Engine) -> None:
    assert [r["relpath"] for r in browse.find_by_name(engine, "100%_")] == ["odd names/100%_sure_a.jpg"]
    assert [r["relpath"] for r in browse.find_by_name(engine, "IMG_00")][:1] == ["a/img_000.jpg"]
    assert len(browse.find_by_name(engine, "img_", limit=4)) == 4
    assert browse.find_by_name(engine, "   ") == []


def test_labels_and_details(engine: Engine) -> None:
    counts = browse.label_counts(engine)
    assert sum(n for _, n in counts) == engine.size and counts == sorted(counts, key=lambda c: (-c[1], c[0]))
    info = browse.details(engine, 0)
    assert info["relpath"] == "a/img_000.jpg" and len(info["labels"]) == 5
    assert info["hist"].shape == (128,) and info["hist"].sum() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(KeyError):
        browse.details(engine, 10_000)


def test_full_image_only_from_inside_the_collection(engine: Engine, tmp_path: Path) -> None:
    jpeg = browse.full_image(engine, 0, max_side=64)
    assert jpeg[:2] == b"\xff\xd8"
    meta = engine.lookup_ids([1])[1]
    assert browse.inside_collection(engine, meta["path"], meta["collection"])
    outside = tmp_path / "secret.jpg"
    save(synthetic_image(99), outside)
    assert not browse.inside_collection(engine, str(outside), meta["collection"])
    assert not browse.inside_collection(engine, meta["path"] + "/../../../etc/passwd", meta["collection"])
    # the file was replaced by a symlink that leaves the collection: refused, not served
    original = Path(meta["path"]).read_bytes()
    os.replace(meta["path"], str(tmp_path / "kept"))
    os.symlink(outside, meta["path"])
    try:
        with pytest.raises(PermissionError, match="outside the collection"):
            browse.full_image(engine, 1)
    finally:
        os.unlink(meta["path"])
        Path(meta["path"]).write_bytes(original)
