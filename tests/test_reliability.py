"""Reliability beyond odd files (tests/test_hostile.py) and kills (tests/test_ingest.py): folders that change between
runs, many searches at once on one engine (threads and app sessions), an ingestion running while searches are served,
and nothing served from outside the collection; uploads are kept only when the person asks. Real lakes, real
subprocesses, the real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import jpeg_bytes, make_collection, save, synthetic_image

from imgrec.config import Config
from imgrec.index import StaleIndex
from imgrec.lake import Lake
from imgrec.measures import MEASURES
from imgrec.search import Engine, QueryError
from pipelines.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda s: None}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photos, lake): 16 synthetic photos, ingested and indexed."""
    base = tmp_path_factory.mktemp("reliability")
    make_collection(base / "photos", 16)
    ingest([base / "photos"], Config.load(base / "lake", workers=2), **QUIET)
    return base / "photos", base / "lake"


def _rows(lake: Path) -> dict[str, dict]:
    conn = Lake(lake).connect()
    try:
        return {r["relpath"]: r for r in conn.frame(
            "SELECT i.relpath, i.image_id, i.content_hash, c.hist, h.phash FROM images i JOIN color c USING "
            "(image_id) JOIN hashes h USING (image_id)").iter_rows(named=True)}
    finally:
        conn.close()


# --- changing folders -----------------------------------------------------------------------------------------------


def test_changing_folders_over_several_runs(tmp_path: Path) -> None:
    """Round after round of adds, edits, renames, moves and deletions: unchanged bytes keep their image_id (renamed
    or moved too), edited files get new ids and new features, and a deleted image never comes back in a search."""
    root, lake = tmp_path / "photos", tmp_path / "lake"
    paths = make_collection(root, 10)
    cfg = Config.load(lake, workers=1)
    ingest([root], cfg, **QUIET)
    engine = Engine(cfg)
    first = _rows(lake)
    rel = {p: p.relative_to(root).as_posix() for p in paths}
    deleted_bytes = paths[4].read_bytes()
    deleted_id = first[rel[paths[4]]]["image_id"]

    # round 1: rename in place, move to a new folder, edit, delete, add
    os.rename(paths[0], root / "a" / "renamed.jpg")
    (root / "new" / "deep").mkdir(parents=True)
    shutil.move(paths[1], root / "new" / "deep" / "moved.png")
    save(synthetic_image(500), paths[2])  # new content under the same name
    paths[4].unlink()
    save(synthetic_image(501), root / "added.jpg")
    report = ingest([root], cfg, **QUIET)
    assert (report.processed, report.relinked, report.removed) == (2, 2, 1)
    now = _rows(lake)
    assert now["a/renamed.jpg"]["image_id"] == first[rel[paths[0]]]["image_id"]
    assert now["new/deep/moved.png"]["image_id"] == first[rel[paths[1]]]["image_id"]
    edited, before = now[rel[paths[2]]], first[rel[paths[2]]]
    assert edited["image_id"] != before["image_id"] and edited["content_hash"] != before["content_hash"]
    assert not np.allclose(edited["hist"], before["hist"])  # new features, not the old ones under a new id
    from imgrec.features.extract import extract

    fresh = extract(paths[2].read_bytes(), model=None, thumb_size=None)
    assert np.allclose(edited["hist"], fresh.hist) and edited["phash"] == int(fresh.phash)
    assert rel[paths[4]] not in now and len(now) == 10

    engine.refresh()
    every = engine.search([deleted_bytes], "mix", k=100)  # its own bytes as the query: still not found
    assert deleted_id not in {r.image_id for r in every.results} and len(every.results) == 10
    with pytest.raises(QueryError, match="not in the lake"):
        engine.search([deleted_id])
    for measure in MEASURES:
        assert deleted_id not in {r.image_id for r in engine.search([0 if deleted_id else 1], measure, 100).results}

    # round 2: the renamed file goes back, the moved one is edited, a file is deleted and its bytes come back
    # under another name in the same run (a move across runs would be a delete then an add: a new id)
    os.rename(root / "a" / "renamed.jpg", paths[0])
    save(synthetic_image(502), root / "new" / "deep" / "moved.png")
    gone = first[rel[paths[3]]]
    shutil.move(paths[3], root / "again.jpg")
    ingest([root], cfg, **QUIET)
    again = _rows(lake)
    assert again[rel[paths[0]]]["image_id"] == first[rel[paths[0]]]["image_id"]
    assert again["new/deep/moved.png"]["image_id"] not in {r["image_id"] for r in first.values()}
    assert again["again.jpg"]["image_id"] == gone["image_id"]
    assert len(again) == 10 and len({r["image_id"] for r in again.values()}) == 10
    engine.refresh()
    assert deleted_id not in {r.image_id for r in engine.search([deleted_bytes], "mix", k=100).results}
    conn = Lake(lake).connect()
    assert conn.one("SELECT count(*) FROM images WHERE image_id = ?", [deleted_id]) == 0
    conn.close()


# --- many users -----------------------------------------------------------------------------------------------------


def _queries(photos: Path) -> list[tuple[list, str, list]]:
    """20 different searches: every measure; ids, uploads (bytes), several images, negatives."""
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    out = []
    for i in range(20):
        measure = MEASURES[i % 4]
        kind = i // 4
        if kind == 0:
            q, neg = [i], []
        elif kind == 1:
            q, neg = [files[i % len(files)].read_bytes()], []
        elif kind == 2:
            q, neg = [i % 16, files[(i + 3) % len(files)].read_bytes()], []
        elif kind == 3:
            q, neg = [jpeg_bytes(synthetic_image(900 + i))], [i % 16]
        else:
            q, neg = [(i + 1) % 16, (i + 5) % 16, files[i % len(files)].read_bytes()], []
        out.append((q, measure, neg))
    return out


def _outcome(engine: Engine, q: list, measure: str, neg: list) -> tuple[int, list[int], list[float]]:
    resp = engine.search(q, measure, k=8, negatives=neg)
    return resp.snapshot, [r.image_id for r in resp.results], [round(r.score, 5) for r in resp.results]


def test_twenty_concurrent_searches_equal_the_searches_alone(small: tuple[Path, Path]) -> None:
    photos, lake = small
    engine = Engine(Config.load(lake))
    queries = _queries(photos)
    alone = [_outcome(engine, *q) for q in queries]
    with ThreadPoolExecutor(max_workers=20) as pool:
        together = list(pool.map(lambda q: _outcome(engine, *q), queries * 2))  # 40 searches, 20 at a time
    assert together == alone * 2
    assert len({tuple(ids) for _, ids, _ in alone}) > 10  # the searches really differ


def test_searches_keep_working_while_an_ingestion_runs(small: tuple[Path, Path], tmp_path: Path) -> None:
    """An `imgrec ingest` adds a folder while 4 threads search and another refreshes the engine as the app does:
    no search fails; those on the old snapshot give the old results; after the run the new images are found."""
    photos, lake0 = small
    lake = tmp_path / "lake"
    shutil.copytree(lake0, lake)
    more = tmp_path / "more"
    added = make_collection(more, 12, start=300)
    engine = Engine(Config.load(lake))
    engine.auto_index = False
    queries = _queries(photos)[:4]
    alone = [_outcome(engine, *q) for q in queries]
    old_snapshot = engine.snapshot
    stop, errors, done = threading.Event(), [], []

    def searcher(i: int) -> None:
        while not stop.is_set():
            try:
                out = _outcome(engine, *queries[i])
                if out[0] == old_snapshot:
                    assert out == alone[i]
                done.append(out[0])
                time.sleep(0.02)  # a person's pace, more or less: leave the ingestion some CPU
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")

    def refresher() -> None:  # what the app's lake_status does on every rerun
        while not stop.is_set():
            try:
                engine.refresh(auto_index=False)
            except StaleIndex:
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(f"refresh: {type(exc).__name__}: {exc}")
            time.sleep(0.05)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)] + [threading.Thread(target=refresher)]
    for t in threads:
        t.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "imgrec.cli", "ingest", str(more), "--lake", str(lake),
                               "--workers", "1", "--commit-every", "3", "--quiet"], capture_output=True, text=True,
                              timeout=300)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert proc.returncode == 0, proc.stderr
    assert not errors, errors[:5]
    assert len(done) >= 4
    engine.refresh()
    assert engine.size == 16 + 12 and engine.snapshot > old_snapshot
    top = engine.search([added[5].read_bytes()], "mix", k=1).results[0]
    assert top.path == str(added[5]) and top.score == pytest.approx(1.0, abs=1e-3)
    print(f"\n{len(done)} searches during the ingestion, {sum(s == old_snapshot for s in done)} on the old snapshot")


def test_app_sessions_share_one_engine_and_agree(small: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Four app sessions open at once (AppTest instances, stepped in turn: AppTest itself is not thread-safe; the
    engine's own concurrency is the test above), each with its own upload and measure, all on the process-wide
    engine: each shows what the engine gives alone, and each session's state stays its own."""
    from streamlit.testing.v1 import AppTest

    from imgrec import ui

    photos, lake = small
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    engine = ui.open_engine(str(lake))
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    n = 4
    sessions = [AppTest.from_file(ROOT / "pages" / "1_Search.py", default_timeout=120).run() for _ in range(n)]
    for i, at in enumerate(sessions):
        at.selectbox(key="measure").set_value(MEASURES[i % 4]).run()
    for i, at in enumerate(sessions):
        at.file_uploader(key="uploads").upload(files[i].name, files[i].read_bytes(), "image/jpeg")
        at.run()
    for at in sessions:
        next(b for b in at.button if b.label == "Search").click().run()
    for at in sessions:
        at.run()  # a rerun of each session (paging, another session's search meanwhile) keeps its own results
    for i, at in enumerate(sessions):
        assert not at.exception and not at.error
        keys = [b.key for b in at.button if (b.key or "").startswith("more_")]
        expected = engine.search([files[i].read_bytes()], MEASURES[i % 4], k=5, exclude_query=True)
        assert keys == [f"more_{r.image_id}" for r in expected.results], i
        assert at.main.subheader[-1].value == f"Results for {files[i].name}"
    assert ui.open_engine(str(lake)) is engine  # one engine for every session
    ui.open_engine.clear()


# --- no reach outside the collection; uploads kept only on request ----------------------------------------------


def test_full_image_refuses_paths_out_of_a_tampered_lake(small: tuple[Path, Path], tmp_path: Path) -> None:
    """A lake edited by hand (relpaths with '..', absolute ones) still serves nothing outside the root."""
    from imgrec import browse
    from imgrec.lake import schemas

    photos, lake0 = small
    lake = tmp_path / "lake"
    shutil.copytree(lake0, lake)
    secret = tmp_path / "secret.jpg"
    save(synthetic_image(77), secret)
    conn = Lake(lake).connect()
    row = conn.frame("SELECT * EXCLUDE (path) FROM images WHERE image_id = 0").row(0, named=True)
    features = {t: conn.frame(f"SELECT * FROM {t} WHERE image_id = 0") for t in ("color", "hashes", "embeddings")}
    conn.close()
    evil = ["../secret.jpg", "../../../../../../../../etc/passwd", "/etc/passwd", "a/../../secret.jpg"]
    with Lake(lake).writer() as w:  # rows a person could write into the Parquet files by hand
        m = w.manifest
        sch = schemas(m.bins, int(m.model["dim"]))
        ids = [1000 + i for i in range(len(evil))]
        frames = {"images": pl.DataFrame([{**row, "image_id": i, "relpath": r, "version": None}
                                          for i, r in zip(ids, evil, strict=True)], schema=sch["images"])}
        for t, df in features.items():
            frames[t] = pl.concat([df.with_columns(pl.lit(i, pl.Int64).alias("image_id")) for i in ids])
        w.commit(frames, next_image_id=ids[-1] + 1)
    engine = Engine(Config.load(lake))
    assert engine.size == 16 + len(evil)
    assert browse.full_image(engine, 0, max_side=64)[:2] == b"\xff\xd8"
    for i in ids:
        with pytest.raises((PermissionError, FileNotFoundError)):
            browse.full_image(engine, i)
    with pytest.raises(PermissionError):
        browse.full_image(engine, ids[0])  # ../secret.jpg exists: refused, not merely missing


def test_add_uploads_to_the_lake(small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads stay in memory; "Add these uploads to the lake" writes them under <lake>/uploads with safe,
    content-based names (never the upload's path) and ingests that folder in the background."""
    from streamlit.testing.v1 import AppTest

    from imgrec import jobs, ui

    _, lake0 = small
    lake = tmp_path / "lake"
    shutil.copytree(lake0, lake)
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    good = [jpeg_bytes(synthetic_image(700)), jpeg_bytes(synthetic_image(701))]
    at = AppTest.from_file(ROOT / "pages" / "1_Search.py", default_timeout=120).run()
    at.file_uploader(key="uploads").set_value([
        ("../../../../tmp/evil name.jpg", good[0], "image/jpeg"), ("..\\..\\win.JPG", good[1], "image/jpeg"),
        ("notes.jpg", b"not a picture", "image/jpeg")]).run()
    assert not at.exception
    assert not (lake / "uploads").exists()  # searching never writes uploads anywhere
    at.button(key="add_uploads").click().run()
    assert not at.exception
    assert any("notes.jpg" in w.value and "not an image" in w.value for w in at.warning)
    saved = sorted(p.name for p in (lake / "uploads").iterdir())
    assert len(saved) == 2 and all(n.endswith(".jpg") and "/" not in n and not n.startswith(".") for n in saved)
    assert saved[0].startswith("evil_name-") or saved[1].startswith("evil_name-")
    job = jobs.current(str(lake))
    assert job is not None
    state = job.wait(180)
    assert state.status == "done", state.error
    at.run()  # the next rerun serves the new snapshot
    assert not at.exception
    assert {m.value for m in at.sidebar.metric} == {"18"}
    # the same upload again: same name, nothing overwritten or doubled
    folder, again, problems = ui.save_uploads(lake, [("x.jpg", good[0])])
    assert again[0].name in saved and len(list(folder.iterdir())) == 2 and not problems
    ui.open_engine.clear()
