"""The lake on a real S3 API server (moto, in its own process, on 127.0.0.1): ingest -> index -> search gives what
a local lake gives; an S3 collection root; SIGKILLs resume to the same lake; bad credentials, a missing bucket and
an unreachable endpoint are one-line errors that change nothing; the app serves an S3 lake."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, make_collection, start_s3_server, synthetic_image

from imgrec.config import Config
from imgrec.lake import Lake
from imgrec.search import Engine
from imgrec.storage import open_store
from pipelines.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def _lake(s3: object) -> str:
    return f"{s3.bucket('imgrec-test')}/lake-{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgrec.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _rows(lake: str | Path) -> list[tuple]:
    conn = Lake(lake).connect()
    try:
        return conn.sql("SELECT i.image_id, i.relpath, i.content_hash, h.phash, h.dhash FROM images i "
                        "JOIN hashes h USING (image_id) ORDER BY image_id")
    finally:
        conn.close()


def _results(engine: Engine, query: object, measure: str) -> list[tuple[str, float]]:
    return [(r.relpath, round(r.score, 5)) for r in engine.search([query], measure=measure, k=5).results]


def test_ingest_index_and_search_on_s3_equal_a_local_lake(s3: object, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_collection(photos, 16)
    local, remote = tmp_path / "lake", _lake(s3)
    for lake in (local, remote):
        report = ingest([photos], Config.load(lake, workers=2), progress=False, log=lambda s: None)
        assert report.processed == 16 and not report.interrupted
    assert [r[1:] for r in _rows(local)] == [r[1:] for r in _rows(remote)]
    keys = {e.path.split("/")[0] for e in open_store(remote).list("")}
    assert keys == {"_snapshots", "tables", "indexes"}  # the lake, and its index beside it
    a, b = Engine(Config.load(local)), Engine(Config.load(remote))
    upload = jpeg_bytes(synthetic_image(5))
    for query in (0, 7, upload):
        for measure in ("mix", "color", "hash", "embedding"):
            assert _results(a, query, measure) == _results(b, query, measure), (query, measure)
    assert b._conn is None  # the search read nothing of the lake: the index (in the cache) held it all
    assert b.thumbnails([0, 1]) == a.thumbnails([0, 1])
    stats = json.loads(_cli("stats", "--lake", remote, "--json").stdout)
    assert stats["images"] == 16 and stats["collections"][0]["images"] == 16
    out = _cli("search", str(photos / "a" / "img_000.jpg"), "--lake", remote, "--measure", "mix", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["path"].endswith("a/img_000.jpg")


def test_an_s3_collection_root(s3: object, tmp_path: Path) -> None:
    bucket = s3.bucket("photos-bucket")  # type: ignore[attr-defined]
    prefix = f"{bucket}/shoot-{uuid.uuid4().hex[:6]}"
    store = open_store(prefix)
    local = tmp_path / "photos"
    for p in make_collection(local, 8):
        store.write_bytes(p.relative_to(local).as_posix(), p.read_bytes())
    store.write_bytes("bad/broken.jpg", b"not an image at all")
    store.write_bytes("notes.txt", b"not an image by name")
    lake = _lake(s3)
    report = ingest([prefix], Config.load(lake, workers=2), progress=False, log=lambda s: None)
    assert (report.processed, report.skipped) == (8, 1)
    engine = Engine(Config.load(lake))
    assert engine.size == 8
    conn = engine.conn
    root = conn.one("SELECT root FROM collections")
    assert root == prefix
    assert dict(conn.sql("SELECT relpath, reason FROM skipped")) == {
        "bad/broken.jpg": "not an image, or a format imgrec cannot read"}
    from imgrec import browse

    first = conn.sql("SELECT image_id, relpath FROM images ORDER BY image_id LIMIT 1")[0]
    data, _ = browse.image_file(engine, first[0])  # the full image, read from the bucket, inside the root only
    assert data == (local / first[1]).read_bytes()
    again = ingest([prefix], Config.load(lake, workers=2), progress=False, log=lambda s: None)
    assert (again.processed, again.relinked) == (0, 0)  # size and modification time unchanged: nothing read
    time.sleep(1.1)  # S3 times are in seconds
    store.write_bytes(first[1], jpeg_bytes(synthetic_image(99)))  # replaced: read again, a new image
    third = ingest([prefix], Config.load(lake, workers=1), progress=False, log=lambda s: None)
    assert third.processed == 1 and Engine(Config.load(lake)).size == 8


def test_killed_ingestions_on_s3_resume_to_the_same_lake(s3: object, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_collection(photos, 20)
    lake = _lake(s3)
    reference = tmp_path / "reference"
    ingest([photos], Config.load(reference, workers=1), progress=False, build_index=False, log=lambda s: None)
    rng = random.Random(7)
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(photos), "--lake", lake, "--workers", "2",
           "--commit-every", "2", "--batch-size", "2", "--quiet", "--progress-json"]
    kills = 0
    deadline = time.monotonic() + 400
    while kills < 10 and time.monotonic() < deadline:
        # killed a random moment after its first image is handled (not at a random time from its start: a faster
        # machine, or faster code, finished the whole run before the first kill), so each run leaves work undone
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        working = any(json.loads(line).get("event") == "progress" for line in proc.stdout)
        if working:
            time.sleep(rng.uniform(0.0, 0.25))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            assert len({r[0] for r in _rows(lake)} if Lake(lake).exists else ()) == len(
                _rows(lake) if Lake(lake).exists else ())  # never an id twice, at any kill
            continue
        proc.stdout.close()
        if proc.wait() == 0:  # finished before its kill: nothing left to interrupt
            break
    assert kills >= 5, kills
    final = _cli(*cmd[3:])
    assert final.returncode == 0, final.stderr
    assert [r[1:] for r in _rows(lake)] == [r[1:] for r in _rows(reference)]
    assert [r[0] for r in _rows(lake)] == [r[0] for r in _rows(reference)]  # the same ids as an uninterrupted run
    assert Engine(Config.load(lake)).size == 20


def test_bad_credentials_missing_bucket_unreachable_endpoint(s3: object, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_collection(photos, 3)
    lake = _lake(s3)
    assert _cli("ingest", str(photos), "--lake", lake, "--quiet").returncode == 0
    snapshot = Lake(lake).snapshot()
    strict = start_s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # a server that checks the keys
    try:
        cases = [
            ({"AWS_ENDPOINT_URL": strict.endpoint}, lake, "wrong AWS_ACCESS_KEY_ID"),
            ({}, f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/lake", "does not exist"),
            ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, lake, "cannot reach the S3 endpoint"),
        ]
        for env, where, message in cases:
            out = _cli("ingest", str(photos), "--lake", where, "--quiet", env=env, timeout=120)
            err = out.stderr.strip().splitlines()
            assert out.returncode == 2 and message in err[-1] and "Traceback" not in out.stderr, out.stderr[-800:]
            assert "testing" not in out.stderr  # no secret in the message
            out = _cli("stats", "--lake", where, env=env, timeout=120)
            assert out.returncode == 2 and message in out.stderr
    finally:
        strict.proc.terminate()
        strict.proc.wait(10)
    assert Lake(lake).snapshot() == snapshot  # the lake stays at its last snapshot


def test_the_app_serves_an_s3_lake(s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    photos = tmp_path / "photos"
    make_collection(photos, 6)
    lake = _lake(s3)
    ingest([photos], Config.load(lake, workers=1), progress=False, log=lambda s: None)
    monkeypatch.setenv("IMGREC_LAKE", lake)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception and at.title[0].value == "Search"
    assert at.sidebar.metric[0].value == "6"
    ids = at.multiselect(key="picked").options[:1]
    at.multiselect(key="picked").set_value([int(ids[0].split(" ")[0].lstrip("#"))]).run()
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception and not at.error
    assert len([b for b in at.button if (b.key or "").startswith("more_")]) == 5
    collection = at.switch_page("pages/2_Collection.py").run()
    assert not collection.exception and not collection.error


def test_embeddings_survive_the_round_trip(s3: object, tmp_path: Path) -> None:
    """The vectors read back from an S3 lake are the ones written (Parquet through the storage layer)."""
    photos = tmp_path / "photos"
    make_collection(photos, 4)
    lake = _lake(s3)
    ingest([photos], Config.load(lake, workers=1), progress=False, build_index=False, log=lambda s: None)
    conn = Lake(lake).connect()
    vectors = np.stack(conn.frame("SELECT vector FROM embeddings ORDER BY image_id")["vector"].to_numpy())
    conn.close()
    assert vectors.shape == (4, 1280) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
