"""On real photos from ../shared/data (skipped where that folder is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgrec.config import Config
from imgrec.search import Engine
from pipelines.ingest import ingest


@pytest.fixture(scope="module")
def flowers(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Engine]:
    src = shared_data / "oxford_flowers17" / "images"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    classes = sorted(p for p in src.iterdir() if p.is_dir())[:3]
    lake = tmp_path_factory.mktemp("flowers_lake")
    report = ingest(classes, Config.load(lake), progress=False)
    assert report.processed == sum(len(list(c.glob("*.jpg"))) for c in classes)
    return classes[0], Engine(Config.load(lake))


@pytest.mark.parametrize("measure", ["color", "hash", "embedding", "mix"])
def test_a_real_photo_finds_itself_first(flowers: tuple[Path, Engine], measure: str) -> None:
    folder, engine = flowers
    query = folder / "image_0001.jpg"
    resp = engine.search([query], measure, k=5)
    assert resp.results[0].path == str(query)


def test_embedding_neighbours_are_mostly_the_same_flower(flowers: tuple[Path, Engine]) -> None:
    folder, engine = flowers
    hits = 0
    queries = sorted(folder.glob("*.jpg"))[:10]
    for q in queries:
        resp = engine.search([q], "embedding", k=5, exclude_query=True)
        hits += sum(Path(r.path).parent == folder for r in resp.results)
    assert hits / (5 * len(queries)) >= 0.6


def test_corrupt_copy_of_a_real_photo_is_skipped(shared_data: Path, tmp_path: Path) -> None:
    src = next((shared_data / "corel1k_wang" / "images").rglob("*.jpg"), None)
    if src is None:
        pytest.skip("corel1k_wang is absent")
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(src, root / "good.jpg")
    (root / "cut.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    lake = tmp_path / "lake"
    report = ingest([root], Config.load(lake, workers=1), progress=False)
    assert (report.processed, report.skipped) == (1, 1)
