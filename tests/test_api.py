"""The HTTP API (`imgrec serve --api`) for real: a server process on a free loopback port over a lake built here,
and a real HTTP client (httpx). Uploads and ids find themselves first; paths out of the collection, oversize,
non-image and bomb uploads are refused with 4xx and a message; 20 concurrent requests give what they give one at a
time; an API key is required where one is set; nothing listens beyond loopback without one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import polars as pl
import pytest
from conftest import ingest_quietly, jpeg_bytes, make_collection, save, synthetic_image
from hostile import png_declaring
from test_browser import _free_port, _stop

from imgrec.lake import Lake, schemas

KEY = "k3y-for-tests"


def _serve(lake: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgrec.cli", "serve", "--api", "--lake", str(lake), "--port",
                             str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the API exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail("the API did not answer within 60 s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("api")
    photos = base / "photos"
    make_collection(photos, 12)
    ingest_quietly(photos, base / "lake")
    return photos, base / "lake"


@pytest.fixture(scope="module")
def api(lake: tuple[Path, Path]) -> Iterator[str]:
    proc, base = _serve(lake[1], "--max-request-mb", "1")
    try:
        yield base
    finally:
        _stop(proc)


def _id_of(base: str, relpath_end: str) -> int:
    for i in range(12):
        meta = httpx.get(f"{base}/images/{i}").json()
        if meta["relpath"].endswith(relpath_end):
            return i
    raise AssertionError(relpath_end)


def test_an_uploaded_image_of_the_lake_comes_first(api: str, lake: tuple[Path, Path]) -> None:
    photos, _ = lake
    data = (photos / "a" / "img_002.webp").read_bytes()
    r = httpx.post(f"{api}/search", files=[("images", ("q.webp", data, "image/webp"))],
                   data={"measure": "mix", "k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    top = body["results"][0]
    assert top["relpath"] == "a/img_002.webp" and top["collection"] == "photos" and top["score"] > 0.99
    assert "path" not in top and not any(str(photos) in str(v) for v in top.values())  # no server path
    assert len(body["results"]) == 3 and {"decode", "features", "total"} <= set(body["timings_ms"])
    assert body["missing"] == []  # every part of the collection searched (a served shard that did not answer: named)
    thumb = httpx.get(f"{api}{top['thumbnail_url']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    file = httpx.get(f"{api}{top['file_url']}")
    assert file.status_code == 200 and file.content == data and file.headers["content-type"] == "image/webp"


def test_json_search_by_ids_with_filters_and_negatives(api: str) -> None:
    target = _id_of(api, "img_003.jpg")
    r = httpx.post(f"{api}/search", json={"ids": [target], "measure": "embedding", "k": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["image_id"] == target
    r = httpx.post(f"{api}/search", json={"ids": [target], "k": 4, "exclude_query": True, "folders": ["a"]})
    got = r.json()["results"]
    assert got and target not in [x["image_id"] for x in got] and all(x["relpath"].startswith("a/") for x in got)
    first = got[0]["image_id"]
    r = httpx.post(f"{api}/search", json={"ids": [target], "k": 4, "exclude_query": True, "folders": ["a"],
                                          "negative_ids": [first]})
    assert first not in [x["image_id"] for x in r.json()["results"]]  # a negative example is never a result


def test_metadata_stats_health_and_docs(api: str) -> None:
    meta = httpx.get(f"{api}/images/0").json()
    assert {"collection", "relpath", "width", "height", "labels", "thumbnail_url"} <= set(meta) and "path" not in meta
    stats = httpx.get(f"{api}/stats").json()
    assert stats["images"] == 12 and stats["collections"][0]["images"] == 12
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"
    schema = httpx.get(f"{api}/openapi.json").json()
    assert {"/search", "/images/{image_id}", "/thumbnails/{image_id}", "/images/{image_id}/file", "/stats",
            "/healthz"} <= set(schema["paths"])
    docs = httpx.get(f"{api}/docs").text
    assert "/search" in docs and "<script" not in docs and "cdn" not in docs.lower()  # nothing loaded from outside


@pytest.mark.parametrize("path", ["/images/..%2F..%2Fetc%2Fpasswd/file", "/thumbnails/../../etc/passwd",
                                  "/images/-1/file", "/images/99999", "/thumbnails/99999"])
def test_paths_out_of_the_lake_are_refused(api: str, path: str) -> None:
    r = httpx.get(f"{api}{path}")
    assert 400 <= r.status_code < 500 and "root:" not in r.text


def test_bad_uploads_get_4xx_with_a_message(api: str) -> None:
    cases = [
        (b"not an image at all" * 10, 415, "not an image"),
        (png_declaring(30_000, 30_000), 413, "pixels|bomb"),
        (os.urandom(2 * 1024 * 1024), 413, "over the limit"),  # over the server's 1 MB request limit
        (jpeg_bytes(synthetic_image(1))[:300], 422, "corrupt or truncated"),
    ]
    import re

    for data, status, message in cases:
        r = httpx.post(f"{api}/search", files=[("images", ("x.jpg", data, "image/jpeg"))], timeout=60)
        assert r.status_code == status, (status, r.status_code, r.text)
        assert re.search(message, r.json()["detail"]), r.text
    r = httpx.post(f"{api}/search", json={"ids": [99999]})
    assert r.status_code == 404 and "not in the lake" in r.json()["detail"]
    r = httpx.post(f"{api}/search", json={"ids": []})
    assert r.status_code == 422
    r = httpx.post(f"{api}/search", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_20_concurrent_requests_give_the_same_results(api: str, lake: tuple[Path, Path]) -> None:
    photos, _ = lake
    uploads = [p.read_bytes() for p in sorted(photos.rglob("*.*"))[:4]]

    def one(i: int) -> list[tuple[int, float]]:
        if i % 2:
            r = httpx.post(f"{api}/search", files=[("images", ("q.img", uploads[i % 4], "image/jpeg"))],
                           data={"measure": ("mix", "color", "hash", "embedding")[i % 4], "k": "5"}, timeout=120)
        else:
            r = httpx.post(f"{api}/search", json={"ids": [i % 12], "measure": "mix", "k": 5}, timeout=120)
        assert r.status_code == 200, r.text
        return [(x["image_id"], round(x["score"], 5)) for x in r.json()["results"]]

    alone = [one(i) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(one, range(20)))
    assert together == alone


def test_an_api_key_is_required_where_set(lake: tuple[Path, Path]) -> None:
    proc, base = _serve(lake[1], env={"IMGREC_API_KEY": KEY})
    try:
        assert httpx.get(f"{base}/healthz").status_code == 200  # liveness needs no key
        assert httpx.get(f"{base}/stats").status_code == 401
        assert httpx.get(f"{base}/stats", headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(f"{base}/stats", headers={"X-API-Key": KEY}).status_code == 200
        assert httpx.get(f"{base}/thumbnails/0", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.post(f"{base}/search", json={"ids": [0]}).status_code == 401
    finally:
        _stop(proc)


def test_no_listening_beyond_loopback_without_a_key(lake: tuple[Path, Path]) -> None:
    out = subprocess.run([sys.executable, "-m", "imgrec.cli", "serve", "--api", "--lake", str(lake[1]), "--host",
                          "0.0.0.0", "--port", str(_free_port())], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "IMGREC_API_KEY"})
    assert out.returncode == 2 and "needs an API key" in out.stderr


def test_files_outside_the_collection_are_not_served(lake: tuple[Path, Path], tmp_path: Path) -> None:
    photos, lake0 = lake
    tampered = tmp_path / "lake"
    shutil.copytree(lake0, tampered)
    save(synthetic_image(77), tmp_path / "secret.jpg")
    conn = Lake(tampered).connect()
    row = conn.frame("SELECT * EXCLUDE (path) FROM images WHERE image_id = 0").row(0, named=True)
    features = {t: conn.frame(f"SELECT * FROM {t} WHERE image_id = 0") for t in ("color", "hashes", "embeddings")}
    conn.close()
    with Lake(tampered).writer() as w:  # a row written into the Parquet files by hand: ../secret.jpg
        sch = schemas(w.manifest.bins, int(w.manifest.model["dim"]))
        frames = {"images": pl.DataFrame([{**row, "image_id": 500, "relpath": "../secret.jpg", "version": None}],
                                         schema=sch["images"])}
        frames |= {t: df.with_columns(pl.lit(500, pl.Int64).alias("image_id")) for t, df in features.items()}
        w.commit(frames, next_image_id=501)
    proc, base = _serve(tampered)
    try:
        r = httpx.get(f"{base}/images/500/file")
        assert r.status_code == 403 and "outside" in r.json()["detail"]
        assert httpx.get(f"{base}/images/0/file").status_code == 200
    finally:
        _stop(proc)
