"""The storage layer, on a local folder and on a real S3 API server: whole-file writes and reads, create-only,
listing, deletes, pyarrow access; S3 failures in one line (botocore's own exceptions), no secret in them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgrec.storage import LocalStore, S3Store, StorageError, describe, is_remote, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_store(tmp_path / "root")
    s3 = request.getfixturevalue("s3")
    return open_store(f"{s3.bucket('stores')}/{uuid.uuid4().hex[:8]}")


def test_locations() -> None:
    assert is_remote("s3://b/p") and not is_remote("/data/lake")
    assert isinstance(open_store("/tmp/x"), LocalStore)
    with pytest.raises(StorageError, match="names no bucket"):
        S3Store("s3:///prefix")


def test_files(store, tmp_path: Path) -> None:
    assert store.list("nothing") == [] and not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")  # replaced whole
    assert store.read_bytes("a/b.bin") == b"two" and store.exists("a/b.bin")
    assert store.create("a/c.bin", b"first") and not store.create("a/c.bin", b"second")
    assert store.read_bytes("a/c.bin") == b"first"
    local = tmp_path / "upload.bin"
    local.write_bytes(b"x" * 70_000)
    store.put_file(local, "d/e.bin")
    assert store.read_bytes("d/e.bin") == b"x" * 70_000 and not local.exists()
    store.get_file("d/e.bin", tmp_path / "down" / "e.bin")
    assert (tmp_path / "down" / "e.bin").read_bytes() == b"x" * 70_000
    entries = {e.path: e for e in store.list("")}
    assert set(entries) == {"a/b.bin", "a/c.bin", "d/e.bin"} and entries["d/e.bin"].size == 70_000
    assert all(e.mtime_ns > 0 for e in entries.values())
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.bin")
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # gone already: fine
    store.delete_tree("d")
    assert {e.path for e in store.list("")} == {"a/c.bin"}


def test_of_racing_creates_of_one_name_exactly_one_wins(store) -> None:
    """The lake's commits rest on this: writers racing to create the same snapshot file, one of them creates it and
    every other is told it lost, and the file holds the winner's bytes (on S3: a PUT with If-None-Match, atomic)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        for round_ in range(25):
            name = f"race/{round_:03d}.json"
            barrier = __import__("threading").Barrier(8)

            def create(i: int, name: str = name, barrier=barrier) -> bool:
                barrier.wait()
                return store.create(name, f"writer {i}".encode())

            won = list(pool.map(create, range(8)))
            assert won.count(True) == 1, (round_, won)
            assert store.read_bytes(name) == f"writer {won.index(True)}".encode()


def test_pyarrow_reads_through_the_store(store, tmp_path: Path) -> None:
    tmp = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp)
    store.put_file(tmp, "tables/t/part.parquet")
    fs, root = store.arrow()
    assert pq.read_table(f"{root}/tables/t/part.parquet", filesystem=fs)["x"].to_pylist() == [1, 2, 3]


def _client_error(code: str, op: str = "GetObject") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, op)


def test_failures_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    where = "s3://photos/lake/_snapshots"
    cases = {
        NoCredentialsError(): "no S3 credentials",
        _client_error("InvalidAccessKeyId"): "refused the credentials",
        _client_error("SignatureDoesNotMatch"): "refused the credentials",
        _client_error("NoSuchBucket"): "the bucket 'photos' does not exist",
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"): "cannot reach the S3 endpoint",
        _client_error("AccessDenied"): "denied access",
        _client_error("SlowDown"): "kept failing",
        _client_error("ServiceUnavailable"): "kept failing",
    }
    for exc, words in cases.items():
        text = describe(exc, where)
        assert text is not None and words in text, (exc, text)
        assert "s3cr3t" not in text and "\n" not in text
    assert describe(ValueError("something else"), where) is None  # not an S3 failure: kept as it is
