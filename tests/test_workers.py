"""The worker pool survives its workers: a worker that dies mid-chunk (SIGSEGV, SIGKILL from outside, a hang past its
time limit) is replaced, the items it held are retried alone, an item that kills its worker twice becomes a crash
result, and the results keep their order. Then the same through ``imgrec ingest``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_collection, save, synthetic_image

from pipelines.extraction import FAULT_ENV
from pipelines.workers import WorkerPool, crash_reason


def _square(items: list[int]) -> list[tuple[int, int]]:
    out = []
    for x in items:
        if x == 13:  # a poison item: its worker dies, every time
            os.kill(os.getpid(), signal.SIGKILL)
        if x == 21:  # hangs past the time limit
            time.sleep(30)
        out.append((x, x * x))
    return out


def _crashed(item: int, reason: str) -> tuple[int, str]:
    return item, reason


def test_results_in_order_across_workers() -> None:
    with WorkerPool(2, _square, _crashed, per_worker=2) as pool:
        chunks = [list(range(i, i + 3)) for i in range(0, 60, 3) if i not in (12, 21)]
        got = [r for c in pool.map(chunks) for r in c]
    assert got == [(x, x * x) for c in chunks for x in c]
    assert pool.restarts == 0 and pool.crashed == 0 and pool.done


def test_a_poison_item_is_given_up_its_neighbours_are_not() -> None:
    with WorkerPool(2, _square, _crashed) as pool:
        got = [r for c in pool.map([[10, 11, 12], [13, 14], [15, 16]]) for r in c]
    assert [r[0] for r in got] == [10, 11, 12, 13, 14, 15, 16]
    assert got[3] == (13, "the decoder crashed (its worker process was killed by SIGKILL, e.g. by the out-of-memory "
                          "killer)")
    assert got[4] == (14, 196)  # held by the same worker: retried alone, fine
    assert pool.crashed == 1 and pool.restarts == 2  # in its chunk, then alone


def test_a_worker_killed_from_outside_loses_nothing() -> None:
    def slow(items: list[int]) -> list[int]:
        time.sleep(0.05)
        return [x + 1 for x in items]

    with WorkerPool(2, slow, _crashed) as pool:
        victim = pool.pids()[0]
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        got = [r for c in pool.map([[i, i + 100] for i in range(40)]) for r in c]
    assert got == [x + 1 for i in range(40) for x in (i, i + 100)]
    assert pool.restarts >= 1 and pool.crashed == 0


def test_a_hung_item_is_stopped_at_its_time_limit() -> None:
    t0 = time.monotonic()
    with WorkerPool(2, _square, _crashed, item_timeout_s=1.0) as pool:
        got = [r for c in pool.map([[20], [21], [22]]) for r in c]
    assert time.monotonic() - t0 < 10
    assert got[0] == (20, 400) and got[2] == (22, 484)
    assert got[1] == (21, "the decoder took more than 1 s (its worker process was stopped)")


def test_crash_reasons_in_words() -> None:
    assert "killed by SIGKILL, e.g. by the out-of-memory killer" in crash_reason(-9, False, 300)
    assert "exited with code 3" in crash_reason(3, False, 300)


def _ingest(root: Path, lake: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(root), "--lake", str(lake), "--workers", "2",
           "--no-index", "--json", "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def _lake_rows(lake: Path) -> tuple[list[str], dict[str, str]]:
    from imgrec.lake import Lake

    conn = Lake(lake).connect()
    try:
        images = [r[0] for r in conn.sql("SELECT relpath FROM images ORDER BY image_id")]
        skipped = dict(conn.sql("SELECT relpath, reason FROM skipped"))
        assert conn.one("SELECT count(*) - count(DISTINCT image_id) FROM embeddings") == 0
    finally:
        conn.close()
    return images, skipped


def test_ingest_records_a_crashing_file_and_goes_on(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 30)
    save(synthetic_image(99), root / "a" / "crash_me.jpg")
    proc = _ingest(root, lake, {FAULT_ENV: "crash_me.jpg"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["processed"] == 30 and report["skipped"] == 1 and report["worker_restarts"] == 2
    images, skipped = _lake_rows(lake)
    assert len(images) == 30 == len(set(images)) and "a/crash_me.jpg" not in images
    assert skipped == {"a/crash_me.jpg": "the decoder crashed (its worker process was killed by SIGSEGV)"}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.timeout(600)
def test_ingest_survives_a_worker_killed_mid_run(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 120)
    proc = _ingest(root, lake, {}, "--batch-size", "4", "--commit-every", "16")
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= 2:  # the workers are up: let them work a moment, then kill one
            time.sleep(0.5)
            os.kill(kids[0], signal.SIGKILL)
            killed = kids[0]
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["worker_restarts"] >= 1 and report["processed"] == 120 and report["skipped"] == 0
    images, skipped = _lake_rows(lake)
    assert len(images) == 120 == len(set(images)) and not skipped  # every other file in, nothing twice


def test_a_worker_dead_before_its_chunk_is_sent_is_replaced() -> None:
    """A worker that died since the pool last looked (its pipe broken when the next chunk is sent): the chunk goes to
    its replacement; the send's broken pipe once ended a whole ingestion quietly, with exit status 0."""
    with WorkerPool(1, _square, _crashed, per_worker=2) as pool:
        dead = pool.workers[0].proc
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(10)
        assert list(pool.map([[1, 2], [3]])) == [[(1, 1), (2, 4)], [(3, 9)]]
        assert pool.restarts == 1 and pool.crashed == 0
