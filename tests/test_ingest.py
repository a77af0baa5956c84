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
from imgrec.lake import Lake, LakeError
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


def test_uncommitted_parts_are_invisible_and_cleaned(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 3)
    cfg = Config.load(lake, workers=1)
    ingest([root], cfg, progress=False, build_index=False)
    stray = lake / "tables" / "images" / "part-99999999-deadbeef.parquet"
    shutil.copy(next((lake / "tables" / "images").glob("part-*.parquet")), stray)
    (lake / "tables" / "images" / "part-x.parquet.tmp").write_bytes(b"half written")
    assert Lake(lake).connect().count() == 3  # only what the manifest lists is read
    with Lake(lake).writer():
        pass
    assert not stray.exists()
    assert not (lake / "tables" / "images" / "part-x.parquet.tmp").exists()


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with Lake(tmp_path).writer(), pytest.raises(LakeError, match="another process"), Lake(tmp_path).writer():
        pass


def test_killed_ingest_resumes_without_duplicates_or_loss(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_collection(root, 14)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(root), "--lake", str(killed), "--workers", "1",
           "--commit-every", "2", "--no-index", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and Lake(killed).snapshot() < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = current(killed)
    assert 0 < len(partial) < 14, "the kill should land mid-run"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ingest([root], Config.load(clean, workers=1), progress=False, build_index=False)
    resumed, reference = current(killed), current(clean)
    assert resumed == reference  # same ids, same content, nothing lost
    for rel, (image_id, _) in partial.items():
        assert resumed[rel][0] == image_id  # what was committed before the kill was kept
    conn = Lake(killed).connect()
    assert conn.one("SELECT count(*) - count(DISTINCT image_id) FROM embeddings") == 0
    conn.close()


def test_ctrl_c_commits_what_is_finished_and_the_rerun_completes(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 40)
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(root), "--lake", str(lake), "--workers", "2",
           "--batch-size", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and Lake(lake).snapshot() < 0:  # the lake exists once the model is loaded
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["interrupted"] and 0 < report["processed"] < 40
    assert len(current(lake)) == report["processed"]  # everything handled was committed
    rerun = ingest([root], Config.load(lake, workers=1), progress=False)
    assert rerun.processed == 40 - report["processed"] and not rerun.interrupted
    assert len(current(lake)) == 40


def test_stop_event_ends_a_run_cleanly(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 6)
    stop = threading.Event()
    report = ingest([root], Config.load(lake, workers=1), progress=False, stop=stop,
                    on_progress=lambda done, total: stop.set() if done == 3 else None)
    assert report.interrupted and report.processed == 3
    assert len(current(lake)) == 3
