"""The two commit designs of the lake, side by side, on a local folder and on an S3 API server (moto, started here):
imgrec's log of numbered snapshots (every table's new part, then one create-only snapshot file) against Delta Lake
through ``deltalake`` (one Delta table per lake table: a commit per table), for the commit of one ingestion batch
(10 tables, 512 images' rows). Needs ``pip install deltalake moto[server]``.

    .venv/bin/python benchmarks/commit_designs.py --commits 20

Prints ms per batch commit (median) and the requests the design needs; Delta Lake's per-table commits are not
one snapshot of the lake (a reader between two of them sees images without their features), which is why the
lake keeps its own log (docs/design.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
TABLES = ("collections", "images", "removed", "skipped", "color", "hashes", "embeddings", "labels", "thumbnails", "runs")


def frames(n: int, start: int) -> dict:
    import polars as pl

    from imgrec.lake import schemas

    sch = schemas(128, 1280)
    rng = np.random.default_rng(start)
    ids = np.arange(start, start + n)
    out = {
        "images": pl.DataFrame({"image_id": ids, "relpath": [f"p{i}.jpg" for i in ids],
                                "collection": ["c"] * n}).with_columns(
            *[pl.lit(None, dtype=t).alias(c) for c, t in sch["images"].items() if c not in
              ("image_id", "relpath", "collection")]).select(list(sch["images"])).cast(sch["images"]),
        "color": pl.DataFrame({"image_id": ids, "hist": rng.random((n, 128), dtype=np.float32)},
                              schema=sch["color"]),
        "hashes": pl.DataFrame({"image_id": ids, "phash": rng.integers(0, 2**63, n, dtype=np.uint64),
                                "dhash": rng.integers(0, 2**63, n, dtype=np.uint64)}, schema=sch["hashes"]),
        "embeddings": pl.DataFrame({"image_id": ids, "vector": rng.random((n, 1280), dtype=np.float32)},
                                   schema=sch["embeddings"]),
        "thumbnails": pl.DataFrame({"image_id": ids, "thumb": [os.urandom(9000) for _ in ids]},
                                   schema=sch["thumbnails"]),
    }
    for t in ("collections", "removed", "skipped", "labels", "runs"):
        out[t] = pl.DataFrame(schema=sch[t])
    return out


def imgrec_commits(where: str, commits: int, n: int) -> list[float]:
    from imgrec.lake import Lake

    lake = Lake(where)
    out = []
    with lake.writer() as w:
        w.create({"name": "efficientnet-lite0", "checksum": "x", "dim": 1280, "resize": 256, "crop": 224},
                 (8, 4, 4), 256)
        for c in range(commits):
            f = frames(n, c * n)
            t0 = time.perf_counter()
            w.commit(f, next_image_id=(c + 1) * n)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def delta_commits(where: str, commits: int, n: int, storage: dict | None) -> list[float]:
    from deltalake import write_deltalake

    out = []
    for c in range(commits):
        f = frames(n, c * n)
        t0 = time.perf_counter()
        for t in TABLES:
            if f[t].height:
                write_deltalake(f"{where}/{t}", f[t].to_arrow(), mode="append", storage_options=storage)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=20)
    ap.add_argument("--images", type=int, default=512)
    args = ap.parse_args()
    from conftest import start_s3_server

    from imgrec.bench.runner import machine

    m = machine()
    print(f"{m.get('cpu')} ({', '.join(m.get('vector_extensions') or [])}), {m.get('cpus')} cores")
    server = start_s3_server()
    os.environ.update(server.env)
    bucket = server.bucket("designs")
    storage = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
               "aws_conditional_put": "etag"}
    tmp = Path(tempfile.mkdtemp())
    try:
        rows = []
        for name, fn in (
            ("imgrec snapshots, local", lambda: imgrec_commits(str(tmp / "a"), args.commits, args.images)),
            ("Delta Lake, local", lambda: delta_commits(str(tmp / "b"), args.commits, args.images, None)),
            ("imgrec snapshots, S3", lambda: imgrec_commits(f"{bucket}/{uuid.uuid4().hex[:6]}", args.commits,
                                                            args.images)),
            ("Delta Lake, S3", lambda: delta_commits(f"{bucket}/{uuid.uuid4().hex[:6]}", args.commits, args.images,
                                                     storage)),
        ):
            times = fn()
            rows.append((name, statistics.median(times[1:]), max(times)))
        for name, med, worst in rows:
            print(f"{name:26s} {med:8.1f} ms per batch commit (median; max {worst:.0f})")
        print("requests per commit: imgrec 5 part uploads + 1 create-only snapshot; Delta Lake 5 part uploads + 5 "
              "table logs (each create-only), with no record tying the 5 tables into one snapshot")
    finally:
        server.proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
