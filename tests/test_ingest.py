"""Ingestion into the lake: records, features, incremental runs, skipped files, atomic commits, resumption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_collection, save, synthetic_image

from imgrec.config import Config
from imgrec.lake import GRACE_S, Lake
from pipelines.ingest import ingest


def current(lake: Path) -> dict[str, tuple[int, str]]:
    conn = Lake(lake).connect()
    try:
        return {rel: (i, h) for i, rel, h in conn.sql("SELECT image_id, relpath, content_hash FROM images")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def model_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    make_collection(root, 8)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image, ignored")
    (root / "empty.png").write_bytes(b"")
    lake = tmp_path_factory.mktemp("lake")
    ingest([root], Config.load(lake, workers=2, commit_every=3), progress=False)
    return root, lake


def test_metadata_and_features_are_stored(model_lake: tuple[Path, Path]) -> None:
    root, lake = model_lake
    conn = Lake(lake).connect()
    rows = conn.frame("SELECT * FROM images ORDER BY relpath")
    assert rows.height == 8
    assert rows["image_id"].n_unique() == 8
    first = rows.row(0, named=True)
    assert first["collection"] == root.name
    assert Path(first["path"]) == root / first["relpath"]
    assert first["file_name"] == Path(first["relpath"]).name
    assert first["folder"] == str(Path(first["relpath"]).parent)
    assert (first["width"], first["height"]) == (192, 144)
    assert first["size_bytes"] == (root / first["relpath"]).stat().st_size
    assert set(rows["format"]) == {"JPEG", "PNG", "WEBP"}
    assert len(first["content_hash"]) == 32
    for table in ("color", "hashes", "embeddings", "labels", "thumbnails"):
        n = conn.one(f"SELECT count(DISTINCT image_id) FROM {table} JOIN images USING (image_id)")
        assert n == 8, table
    vec = conn.arrow("SELECT vector FROM embeddings LIMIT 1").column(0)[0].values.to_numpy()
    assert vec.shape == (1280,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    labels, probs = conn.sql("SELECT labels, probs FROM labels LIMIT 1")[0]
    assert len(labels) == 5 and all(isinstance(x, str) for x in labels) and probs == sorted(probs, reverse=True)
    hist = conn.arrow("SELECT hist FROM color LIMIT 1").column(0)[0].values.to_numpy()
    assert hist.shape == (128,) and abs(hist.sum() - 1) < 1e-5
    m = Lake(lake).manifest()
    assert m.model["name"] == "efficientnet-lite0" and len(m.model["checksum"]) == 16
    conn.close()


def test_unreadable_files_are_skipped_with_reasons(model_lake: tuple[Path, Path]) -> None:
    _, lake = model_lake
    conn = Lake(lake).connect()
    skipped = dict(conn.sql("SELECT relpath, reason FROM skipped"))
    conn.close()
    assert set(skipped) == {"broken.jpg", "empty.png"}
    assert "empty" in skipped["empty.png"]
    assert "not an image" in skipped["broken.jpg"] or "corrupt" in skipped["broken.jpg"]


def test_rerun_processes_nothing_and_keeps_the_snapshot(model_lake: tuple[Path, Path]) -> None:
    root, lake = model_lake
    before = Lake(lake).snapshot()
    report = ingest([root], Config.load(lake, workers=2), progress=False)
    assert (report.processed, report.unchanged, report.skipped, report.removed) == (0, 8, 0, 0)
    assert Lake(lake).snapshot() == before


def test_incremental_add_change_delete_touch_move(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    paths = make_collection(root, 6)
    cfg = Config.load(lake, workers=1)
    ingest([root], cfg, progress=False, build_index=False)
    ids = current(lake)
    rel = {p: p.relative_to(root).as_posix() for p in paths}

    make_collection(root, 2, start=100)  # 2 new
    save(synthetic_image(999), paths[0])  # new content, same name
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched only
    paths[2].unlink()  # deleted
    moved = root / "moved" / "renamed.png"
    moved.parent.mkdir()
    shutil.move(paths[3], moved)  # same bytes elsewhere

    report = ingest([root], cfg, progress=False, build_index=False)
    assert (report.processed, report.relinked, report.removed) == (3, 2, 1)
    now = current(lake)
    assert len(now) == 7
    assert rel[paths[2]] not in now
    assert now[rel[paths[0]]][0] != ids[rel[paths[0]]][0]  # modified: new id, new features
    assert now[rel[paths[1]]][0] == ids[rel[paths[1]]][0]  # touched: same id
    assert now["moved/renamed.png"][0] == ids[rel[paths[3]]][0]  # moved: identity kept
    assert len({i for i, _ in now.values()}) == 7

    # a third run: nothing to do
    report = ingest([root], cfg, progress=False, build_index=False)
    assert report.processed == report.relinked == report.removed == 0


def test_a_file_that_becomes_readable_is_ingested(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 2)
    bad = root / "later.jpg"
    bad.write_bytes(b"garbage")
    cfg = Config.load(lake, workers=1)
    ingest([root], cfg, progress=False, build_index=False)
    assert "later.jpg" not in current(lake)
    save(synthetic_image(50), bad, "JPEG")
    ingest([root], cfg, progress=False, build_index=False)
    assert "later.jpg" in current(lake)
    conn = Lake(lake).connect()
    assert conn.one("SELECT count(*) FROM skipped") == 0
    conn.close()


def test_uncommitted_parts_are_invisible_and_cleaned_once_old(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 3)
    cfg = Config.load(lake, workers=1)
    ingest([root], cfg, progress=False, build_index=False)
    stray = lake / "tables" / "images" / "part-99999999-deadbeef.parquet"
    shutil.copy(next((lake / "tables" / "images").glob("part-*.parquet")), stray)
    (lake / "tables" / "images" / "part-x.parquet.tmp").write_bytes(b"half written")
    assert Lake(lake).connect().count() == 3  # only what the snapshot lists is read
    with Lake(lake).writer():
        pass
    assert stray.exists()  # young: it may be another writer's part on its way into a snapshot
    old = time.time() - 2 * GRACE_S
    for p in (stray, lake / "tables" / "images" / "part-x.parquet.tmp"):
        os.utime(p, (old, old))
    with Lake(lake).writer():
        pass
    assert not stray.exists() and not (lake / "tables" / "images" / "part-x.parquet.tmp").exists()
    assert Lake(lake).connect().count() == 3


KILLS = 20


def _lake_state(lake: Path) -> dict[str, object]:
    """Everything that must come out the same: images, features, labels, thumbnails, skipped files, the index."""
    from imgrec.index import IndexSet

    conn = Lake(lake).connect()
    try:
        out: dict[str, object] = {
            "images": conn.sql("SELECT image_id, relpath, content_hash, width, height, format, mode, size_bytes "
                               "FROM images ORDER BY image_id"),
            "skipped": conn.sql("SELECT relpath, reason FROM skipped ORDER BY relpath"),
            "hashes": conn.sql("SELECT image_id, phash, dhash FROM hashes ORDER BY image_id"),
            "thumbnails": conn.sql("SELECT image_id, thumb FROM thumbnails ORDER BY image_id"),
            "labels": conn.sql("SELECT image_id, labels FROM labels ORDER BY image_id"),
            "color": conn.frame("SELECT image_id, hist FROM color ORDER BY image_id"),
            "embeddings": conn.frame("SELECT image_id, vector FROM embeddings ORDER BY image_id"),
            "duplicates": [conn.one(f"SELECT count(*) - count(DISTINCT image_id) FROM {t}")
                           for t in ("images_all", "color", "hashes", "embeddings", "labels", "thumbnails")],
        }
    finally:
        conn.close()
    idx = IndexSet.open(Lake(lake), expect_snapshot=Lake(lake).snapshot())
    out["index"] = (np.asarray(idx.ids), np.asarray(idx.embeddings, np.float32), np.asarray(idx.color),
                    np.asarray(idx.hashes))
    return out


def _read_everything(lake: Path, stop: threading.Event, errors: list[str], reads: list[int]) -> None:
    """A reader beside the killed writer: every snapshot it finds must open and read in full."""
    from imgrec.index import IndexSet, StaleIndex

    while not stop.is_set():
        try:
            m = Lake(lake).manifest()
            if m is None:
                time.sleep(0.01)
                continue
            conn = Lake(lake).connect(m)
            try:
                n = conn.count()
                for table in ("images_all", "removed", "skipped", "color", "hashes", "embeddings", "labels",
                              "thumbnails", "runs", "collections"):
                    conn.arrow(f"SELECT * FROM {table}")
                assert conn.one("SELECT count(*) FROM images JOIN embeddings USING (image_id)") == n
            finally:
                conn.close()
            try:
                idx = IndexSet.open(Lake(lake))
                assert idx.embeddings.shape[0] == idx.color.shape[0] == idx.size
                if idx.size:
                    assert idx.searcher.count("embedding") == idx.size
            except StaleIndex:
                pass
            reads.append(m.snapshot)
        except Exception as exc:  # noqa: BLE001 (any failure of a reader is what this test looks for)
            errors.append(f"{type(exc).__name__}: {exc}")


def test_killed_ingest_resumes_without_duplicates_or_loss(tmp_path: Path) -> None:
    """SIGKILL an `imgrec ingest` 20 times at random points (half at random times after the start: imports, scan,
    model load; half shortly after the run's first commit: mid-batch, mid-commit, compaction, index build), resuming
    each time, while a reader keeps opening the lake: the final lake and index equal those of one uninterrupted
    run, what was committed before a kill keeps its id, and the reader never fails.

    A run that finishes before its kill is followed by new photos (in a folder that sorts last, so one uninterrupted
    run over the final folder numbers them the same way): every run has work to be killed in, however fast it is."""
    import random

    root = tmp_path / "photos"
    make_collection(root, 24)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(root), "--lake", str(killed), "--workers", "2",
           "--commit-every", "2", "--batch-size", "4", "--quiet"]
    rng = random.Random(20240601)
    stop, errors, reads = threading.Event(), [], []
    reader = threading.Thread(target=_read_everything, args=(killed, stop, errors, reads))
    reader.start()
    kills, completed, kept_checks, photos = 0, 0, 0, 24
    t0 = time.perf_counter()
    try:
        while kills < KILLS and kills + completed < 3 * KILLS and time.perf_counter() - t0 < 600:
            before = current(killed) if Lake(killed).exists else {}
            snap = Lake(killed).snapshot()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            if kills % 2 == 0:
                deadline = time.monotonic() + rng.uniform(0.3, 3.0)
            else:  # shortly after this run's first commit
                limit = time.monotonic() + 60
                while Lake(killed).snapshot() == snap and proc.poll() is None and time.monotonic() < limit:
                    time.sleep(0.005)
                deadline = time.monotonic() + rng.uniform(0.0, 0.6)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding workers, at once
                kills += 1
            else:
                completed += 1
            proc.wait()
            after = current(killed) if Lake(killed).exists else {}
            for rel, (image_id, chash) in before.items():  # what was committed before is never lost or renumbered
                assert after[rel] == (image_id, chash)
                kept_checks += 1
            if proc.returncode == 0:  # it finished: new photos for the next run to be killed in
                for i in range(photos, photos + 8):
                    save(synthetic_image(i), root / "z_more" / f"img_{i:03d}{('.jpg', '.png', '.webp')[i % 3]}")
                photos += 8
        kill_seconds = time.perf_counter() - t0
        assert kills >= KILLS, f"only {kills} kills in {kills + completed} runs ({kill_seconds:.0f} s)"
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        stop.set()
        reader.join()
    ingest([root], Config.load(clean, workers=2, commit_every=512), progress=False, log=lambda s: None)
    resumed, reference = _lake_state(killed), _lake_state(clean)
    for key in ("images", "skipped", "hashes", "thumbnails", "labels"):
        assert resumed[key] == reference[key], key  # same ids, rows, bytes; nothing lost, nothing twice
    assert len(resumed["images"]) == photos and resumed["skipped"][0][0] == "broken.jpg"
    assert resumed["color"].equals(reference["color"])
    a, b = (np.stack(x["embeddings"]["vector"].to_list()) for x in (resumed, reference))
    assert np.allclose(a, b, atol=1e-5)  # the same images embedded in other batches
    assert resumed["duplicates"] == [0] * 6
    for x, y in zip(resumed["index"], reference["index"], strict=True):
        assert x.shape == y.shape and np.allclose(x, y, atol=1e-3)
    assert not errors, errors[:5]
    assert len(reads) > 20
    print(f"\n{kills} kills survived ({completed} runs finished before their kill, {photos} photos in the end), "
          f"{len(set(reads))} snapshots read {len(reads)} times by the reader, {kept_checks} committed images checked "
          f"after kills, {kill_seconds:.1f} s")


def test_ctrl_c_commits_what_is_finished_and_the_rerun_completes(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 64)
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(root), "--lake", str(lake), "--workers", "2",
           "--batch-size", "2", "--commit-every", "4", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and Lake(lake).snapshot() < 1 and proc.poll() is None:  # the first commit
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["interrupted"] and 0 < report["processed"] < 64
    assert len(current(lake)) == report["processed"]  # everything handled was committed
    rerun = ingest([root], Config.load(lake, workers=1), progress=False)
    assert rerun.processed == 64 - report["processed"] and not rerun.interrupted
    assert len(current(lake)) == 64


def test_stop_event_ends_a_run_cleanly(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 6)
    stop = threading.Event()
    report = ingest([root], Config.load(lake, workers=1), progress=False, stop=stop,
                    on_progress=lambda done, total: stop.set() if done == 3 else None)
    assert report.interrupted and report.processed == 3
    assert len(current(lake)) == 3


def test_searchable_early_indexes_the_first_images_while_the_run_goes_on(tmp_path: Path) -> None:
    """A new lake ingested with ``searchable_early`` (the app's runs): the first EARLY_COMMIT images are committed
    and indexed at once, so a search finds them while the run goes on (searched here from inside the run, as the app
    does beside it); the run is then stopped before its end (no final index build) and the index of the first
    commit stays. Without it, nothing is searchable before the end. A resumed run completes the index."""
    from imgrec.index import IndexSet, current_dir
    from imgrec.search import Engine
    from pipelines.ingest import EARLY_COMMIT

    root = tmp_path / "photos"
    make_collection(root, EARLY_COMMIT + 22)
    lines: list[str] = []
    for early, lake in ((False, tmp_path / "plain"), (True, tmp_path / "early")):
        stop = threading.Event()
        found: list[tuple[int, int]] = []

        def progress(done: int, total: int, lake: Path = lake, early: bool = early, stop: threading.Event = stop,
                     found: list[tuple[int, int]] = found) -> None:
            if done == EARLY_COMMIT + 2:
                assert (current_dir(Lake(lake)) is not None) == early
                if early:  # the app's engine, opened while the run goes on
                    engine = Engine(Config.load(lake), auto_index=False)
                    first = int(engine.index.ids[7])
                    found.append((engine.size, engine.search([first], "mix", k=3).results[0].image_id - first))
            if done == EARLY_COMMIT + 12:
                stop.set()

        report = ingest([root], Config.load(lake, workers=1), progress=False, stop=stop, searchable_early=early,
                        log=lines.append, on_progress=progress)
        assert report.interrupted and len(current(lake)) == EARLY_COMMIT + 12
        if not early:
            assert current_dir(Lake(lake)) is None  # nothing searchable before the run's end
            continue
        assert found == [(EARLY_COMMIT, 0)]  # the first images, searchable, each finding itself first
        assert IndexSet.open(Lake(lake)).size == EARLY_COMMIT
        assert f"imgrec: {EARLY_COMMIT} images searchable so far" in lines
        report = ingest([root], Config.load(lake, workers=1), progress=False, searchable_early=True,
                        log=lambda s: None)  # resumed: an index exists, so the usual cadence; complete at the end
        assert not report.interrupted and IndexSet.open(Lake(lake)).size == EARLY_COMMIT + 22
