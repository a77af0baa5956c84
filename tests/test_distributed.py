"""``--engine ray`` on a real multi-node Ray cluster on 127.0.0.1 (a head and worker nodes of 1 CPU each, started
once for the module): the same lake as the local engine (ids, hashes, histograms, embeddings, skipped files and
reasons); a worker node removed mid-job; the driver stopped with Ctrl-C, then killed, then resumed; an S3 lake and
collection through the local S3 server; an embedding actor out of memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RAY_NODE, local_ray_cluster, make_collection, save, synthetic_image

from imgrec.config import Config
from imgrec.lake import Lake
from imgrec.storage import open_store
from pipelines.ingest import ingest

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(s3: object) -> Iterator[Any]:
    """Head (1 CPU) + 2 worker nodes (1 CPU each); its processes inherit the S3 server's settings."""
    with local_ray_cluster(2) as c:
        yield c


def _photos(root: Path, n: int) -> Path:
    make_collection(root, n)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    save(synthetic_image(999), root / "b" / "big.png")
    data = (root / "b" / "big.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(data[: len(data) // 3])
    return root


def _quiet(**kw: Any) -> dict[str, Any]:
    return {"progress": False, "log": lambda s: None, **kw}


def _lake_rows(lake: str | Path) -> dict[str, Any]:
    conn = Lake(lake).connect()
    try:
        images = conn.sql("SELECT image_id, relpath, content_hash, width, height, format FROM images ORDER BY 1")
        hashes = conn.sql("SELECT image_id, phash, dhash FROM hashes ORDER BY 1")
        skipped = conn.sql("SELECT relpath, reason FROM skipped WHERE reason IS NOT NULL ORDER BY 1")
        hist = conn.frame("SELECT image_id, hist FROM color ORDER BY image_id")["hist"].to_numpy()
        emb = np.stack(conn.frame("SELECT image_id, vector FROM embeddings ORDER BY image_id")["vector"].to_list())
        runs = [json.loads(s) for (s,) in conn.sql("SELECT stats FROM runs ORDER BY started_at")]
    finally:
        conn.close()
    return {"images": images, "hashes": hashes, "skipped": skipped, "hist": np.stack(list(hist)),
            "emb": np.asarray(emb, dtype=np.float32), "runs": runs}


def _same_lake(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["images"] == b["images"]
    assert a["hashes"] == b["hashes"]
    assert a["skipped"] == b["skipped"]
    np.testing.assert_array_equal(a["hist"], b["hist"])
    cos = np.sum(a["emb"] * b["emb"], axis=1) / (np.linalg.norm(a["emb"], axis=1) * np.linalg.norm(b["emb"], axis=1))
    assert cos.min() >= 0.9999


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """40 photos and 2 broken files, and the lake the local engine makes of them."""
    root = _photos(tmp_path_factory.mktemp("photos"), 40)
    lake = tmp_path_factory.mktemp("local") / "lake"
    report = ingest([root], Config.load(lake, workers=2), **_quiet(build_index=False))
    assert report.processed == 41 and report.skipped == 2
    return root, _lake_rows(lake)


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_ray_ingest_equals_local_ingest(cluster: Any, photos: tuple[Path, dict[str, Any]], tmp_path: Path,
                                        stages: str) -> None:
    root, local = photos
    lake = tmp_path / "lake"
    report = ingest([root], Config.load(lake, engine="ray", commit_every=16, ray_stages=stages),
                    **_quiet(build_index=False))
    assert (report.engine, report.nodes, report.processed, report.skipped) == ("ray", 3, 41, 2)
    # 3 CPUs: fused, an actor on each; split, one embeds and two decode
    assert (report.embed_actors, report.workers) == ((3, 3) if stages == "fused" else (1, 2))
    assert {"read", "decode", "embed"} <= set(report.stages)
    rows = _lake_rows(lake)
    _same_lake(rows, local)
    assert rows["skipped"] == [("a/broken.jpg", rows["skipped"][0][1]), ("b/truncated.png", rows["skipped"][1][1])]
    assert rows["runs"][-1]["engine"] == "ray" and rows["runs"][-1]["workers"] == report.workers
    assert Lake(lake).snapshot() >= 3  # committed every 16 images, not at the end only
    again = ingest([root], Config.load(lake, engine="ray"), **_quiet(build_index=False))
    assert (again.processed, again.unchanged) == (0, 41)  # incremental: nothing sent to the cluster


def test_a_worker_node_removed_mid_job(cluster: Any, photos: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, local = photos
    extra = cluster.add_node(**RAY_NODE)
    cluster.wait_for_nodes()
    removed = threading.Event()

    def on_progress(done: int, total: int) -> None:
        if done == 6 and not removed.is_set():
            cluster.remove_node(extra, allow_graceful=False)  # its running tasks die with it
            removed.set()

    report = ingest([root], Config.load(tmp_path / "lake", engine="ray", commit_every=8, ray_files_per_task=2),
                    **_quiet(build_index=False, on_progress=on_progress))
    assert removed.is_set() and report.nodes == 4
    assert (report.processed, report.skipped, report.interrupted) == (41, 2, False)
    _same_lake(_lake_rows(tmp_path / "lake"), local)  # every image in, once, with the same ids


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "imgrec.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def _until(proc: subprocess.Popen[str], done: int, may_end: bool = False) -> bool:
    """Reads the driver's JSON progress until ``done`` images are handled (False: the run ended first)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["done"] >= done:
            return True
    if may_end:
        return False
    raise AssertionError(f"the run ended first: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")


def test_ctrl_c_then_kill_then_resume(cluster: Any, tmp_path: Path) -> None:
    root = _photos(tmp_path / "photos", 240)  # long enough that Ctrl-C, which Python sees between batches, lands
    ingest([root], Config.load(tmp_path / "local", workers=2), **_quiet(build_index=False))
    local = _lake_rows(tmp_path / "local")
    lake = tmp_path / "lake"
    args = ("ingest", str(root), "--lake", str(lake), "--engine", "ray", "--address", cluster.address,
            "--commit-every", "4", "--no-index", "--progress-json")
    first = _cli(*args)
    _until(first, 8)
    first.send_signal(signal.SIGINT)  # Ctrl-C: commits what is handled, exits 130
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] and 8 <= report["processed"] < 241
    assert Lake(lake).connect().sql("SELECT count(*) FROM images")[0][0] >= 8
    left = 243 - report["processed"] - report["skipped"]
    second = _cli(*args)
    if _until(second, min(5, left), may_end=True):  # (Ctrl-C reaches Python only between batches: the first run
        second.send_signal(signal.SIGKILL)  # may have handled most) the driver dies: the lake keeps its last commit
    second.wait(30)
    third = _cli(*args)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    _same_lake(_lake_rows(lake), local)


def test_an_s3_lake_and_collection(cluster: Any, s3: Any, photos: tuple[Path, dict[str, Any]]) -> None:
    """Ray workers read the photos from S3; the driver writes the lake there."""
    root, local = photos
    store = open_store(s3.bucket("imgrec-ray"))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        store.write_bytes(f"photos/{path.relative_to(root)}", path.read_bytes())
    lake = f"{s3.bucket('imgrec-ray')}/lake"
    report = ingest([f"{s3.bucket('imgrec-ray')}/photos"], Config.load(lake, engine="ray"),
                    **_quiet(build_index=False))
    assert (report.processed, report.skipped) == (41, 2)
    rows = _lake_rows(lake)
    assert [r[1:] for r in rows["images"]] == [r[1:] for r in local["images"]]
    assert rows["hashes"] == local["hashes"] and rows["skipped"] == local["skipped"]


def test_an_embedding_actor_out_of_memory_names_the_batch_size(cluster: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrec.lake import LakeError
    from pipelines.distributed import FAULT_OOM_ENV

    root = tmp_path / "photos"
    make_collection(root, 6)
    monkeypatch.setenv(FAULT_OOM_ENV, "1")
    cfg = Config.load(tmp_path / "lake", engine="ray", ray_stages="split", batch_size=4)
    with pytest.raises(LakeError, match=r"ran out of .* memory .*: lower --batch-size \(now 4; try 2\)"):
        ingest([root], cfg, **_quiet(build_index=False))


def test_a_file_that_crashes_the_decoder_is_skipped_like_local(cluster: Any, tmp_path: Path) -> None:
    """A native crash (SIGSEGV) in the fused actors' worker process: retried alone, then recorded as skipped with
    the local engine's reason; its neighbours are ingested."""
    root = tmp_path / "photos"
    make_collection(root, 8)
    env = {**os.environ, "IMGREC_FAULT_CRASH_ON": "img_002.webp"}
    reports = []
    for engine, lake in (("ray", tmp_path / "ray"), ("local", tmp_path / "local")):
        args = ["ingest", str(root), "--lake", str(lake), "--engine", engine, "--no-index", "--json", "--workers", "2"]
        if engine == "ray":
            args += ["--address", cluster.address]
        proc = _cli(*args, env=env)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip(), (engine, err)
        reports.append(json.loads(out))
    assert [(r["processed"], r["skipped"]) for r in reports] == [(7, 1), (7, 1)]
    assert _lake_rows(tmp_path / "ray")["skipped"] == _lake_rows(tmp_path / "local")["skipped"]


def test_pools_fit_the_cluster(tmp_path: Path) -> None:
    from pipelines.distributed import Cluster, Pools, plan_pools

    cfg = Config.load(tmp_path / "lake")
    assert plan_pools(cfg, Cluster(16, 1, 1, False, "x")) == Pools(False, 1, 15)  # a GPU: CPUs decode, it embeds
    assert plan_pools(cfg, Cluster(10, 0, 3, False, "x")) == Pools(True, 10, 10)  # CPUs only: fused, one per CPU
    split = cfg.with_(ray_stages="split")
    assert plan_pools(split, Cluster(10, 0, 3, False, "x")) == Pools(False, 4, 6)
    assert plan_pools(split.with_(embed_actors=9), Cluster(4, 0, 1, False, "x")) == Pools(False, 3, 1)
    with pytest.raises(Exception, match="at least 2 CPUs"):
        plan_pools(split, Cluster(1, 0, 1, False, "x"))


def test_no_ray_process_is_left_behind_by_a_local_instance(tmp_path: Path) -> None:
    """Without --address the command starts Ray on 127.0.0.1 and stops it at the end."""
    root = tmp_path / "photos"
    make_collection(root, 4)
    before = _ray_processes()
    t0 = time.time()
    proc = _cli("ingest", str(root), "--lake", str(tmp_path / "lake"), "--engine", "ray", "--no-index", "--json",
                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out)["engine"] == "ray" and json.loads(out)["processed"] == 4
    deadline = time.time() + 20
    while _ray_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before, f"left running after {time.time() - t0:.0f} s"


def _ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "photos"
    make_collection(root, 2)
    proc = _cli("ingest", str(root), "--lake", str(tmp_path / "lake"), "--address", f"127.0.0.1:{port}", "--quiet")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (tmp_path / "lake" / "tables" / "images").exists()  # nothing written

