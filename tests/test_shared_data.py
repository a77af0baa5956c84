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


def test_ray_ingest_searches_exactly_like_local(flowers: tuple[Path, Engine], tmp_path: Path) -> None:
    """`imgrec ingest ... --engine ray` (a local Ray instance started and stopped by the command) gives a lake
    whose searches are those of the local engine's: same images, same order, same scores, every measure."""
    pytest.importorskip("ray")
    import subprocess
    import sys

    folder, local = flowers
    classes = sorted(p for p in folder.parent.iterdir() if p.is_dir())[:3]
    lake = tmp_path / "lake"
    proc = subprocess.run([sys.executable, "-m", "imgrec.cli", "ingest", *map(str, classes), "--lake", str(lake),
                           "--engine", "ray", "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    ray_engine = Engine(Config.load(lake))
    for measure in ("color", "hash", "embedding", "mix"):
        for q in [*sorted(folder.glob("*.jpg"))[:3], sorted(classes[2].glob("*.jpg"))[5]]:
            a, b = (e.search([q], measure, k=5, exclude_query=True).results for e in (local, ray_engine))
            assert [r.path for r in a] == [r.path for r in b], (measure, q)
            assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-5)
    two = [sorted(classes[0].glob("*.jpg"))[1], sorted(classes[1].glob("*.jpg"))[1]]
    a, b = (e.search(two, "mix", k=5).results for e in (local, ray_engine))
    assert [r.path for r in a] == [r.path for r in b]


def test_a_sharded_index_searches_like_one_graph(flowers: tuple[Path, Engine], tmp_path: Path) -> None:
    """`imgrec index --shards 4` then `imgrec search` (a copy of the lake): the same images, order and scores as the
    unsharded index, every measure, one photo and two."""
    import json
    import subprocess
    import sys

    folder, local = flowers
    lake = tmp_path / "lake"
    shutil.copytree(local.lake.root, lake)

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "imgrec.cli", *args], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert json.loads(cli("index", "--lake", str(lake), "--shards", "4"))["shards"]["count"] == 4
    photos = sorted(folder.glob("*.jpg"))
    for measure in ("color", "hash", "embedding", "mix"):
        for queries in ([photos[2]], [photos[4], sorted(folder.parent.iterdir())[1] / "image_0090.jpg"]):
            queries = [q for q in queries if q.is_file()]
            got = json.loads(cli("search", *map(str, queries), "--lake", str(lake), "--measure", measure, "-k", "5",
                                 "--json"))["results"]
            want = local.search(queries, measure, k=5).results
            assert [r["path"] for r in got] == [r.path for r in want], (measure, queries)
            assert [r["score"] for r in got] == pytest.approx([r.score for r in want], abs=1e-5)
