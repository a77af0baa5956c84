"""The lake on S3 against the lake on disk, side by side on the same photos: ingestion images/s (photos read from a
local folder and from an S3 prefix), the index build, an engine's open, the search stage and the metadata lookups a
page makes (DuckDB over the snapshot: a folder, thumbnails by id), with an S3 API server (moto, started here) on
127.0.0.1. Needs ``pip install moto[server]``.

    .venv/bin/python benchmarks/s3_vs_local.py --n 400          # photos of ../shared/data/oxford_flowers17

moto answers from memory on the same machine: the S3 figures show the protocol's cost (requests, uploads), not a
network's; a real S3 adds its latency (10-50 ms a request) to each.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17" / "images"


def p50(fn, reps: int = 30) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(name: str, lake: str) -> list[tuple[str, float]]:
    """An engine's open, its search stage and the metadata lookups of a page, on one lake."""
    from imgrec.config import Config
    from imgrec.search import Engine

    t0 = time.perf_counter()
    engine = Engine(Config.load(lake))
    rows = [(f"open an engine on the {name} lake (ms; its index in the cache: downloaded once)",
             (time.perf_counter() - t0) * 1000)]
    ids = engine.index.ids.tolist()
    it = iter(range(10**9))
    rows.append((f"search stage, mix, an image of the {name} lake (ms p50)",
                 p50(lambda: engine.search([ids[next(it) % len(ids)]], "mix", k=10))))
    rows.append((f"a folder filter, mix ({name} lake, DuckDB over the snapshot, ms p50)",
                 p50(lambda: engine.search([ids[0]], "mix", k=10, folders=["00_daffodil"]))))
    fresh = Engine(Config.load(lake))
    t0 = time.perf_counter()
    fresh.lookup_ids([ids[0]])
    rows.append((f"first metadata query of a new engine ({name} lake, ms: DuckDB opens the snapshot)",
                 (time.perf_counter() - t0) * 1000))
    rows.append((f"metadata of 10 images by id ({name} lake, ms p50)", p50(lambda: fresh.lookup_ids(ids[:10]))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    from conftest import start_s3_server

    from imgrec.bench.runner import machine
    from imgrec.config import Config
    from imgrec.storage import open_store
    from pipelines.ingest import ingest

    files = sorted(DATA.glob("*/*.jpg"))[: args.n] or sys.exit(f"no photos under {DATA}")
    m = machine()
    print(f"{m.get('cpu')} ({', '.join(m.get('vector_extensions') or [])}), {m.get('cpus')} cores; {len(files)} photos")
    server = start_s3_server()
    os.environ.update(server.env)
    bucket = server.bucket("bench")
    tmp = Path(tempfile.mkdtemp())
    try:
        photos = tmp / "photos"
        for f in files:
            (photos / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, photos / f.parent.name / f.name)
        prefix = f"{bucket}/photos"
        store = open_store(prefix)
        for f in files:
            store.write_bytes(f"{f.parent.name}/{f.name}", f.read_bytes())
        lakes = {"local": str(tmp / "lake"), "s3": f"{bucket}/lake-{uuid.uuid4().hex[:6]}"}
        rows: list[tuple[str, float]] = []
        for name, lake in lakes.items():
            for source, root, target in (("local photos", photos, lake), ("S3 photos", prefix, lake + "-from-s3")):
                t0 = time.perf_counter()
                rep = ingest([root], Config.load(target, workers=2), progress=False, log=lambda s: None)
                rows.append((f"ingest {source} into a {name} lake (images/s, index built)",
                             rep.processed / (time.perf_counter() - t0)))
            rows += measure(name, lake)
        for what, value in rows:
            print(f"{value:10.1f}  {what}")
    finally:
        server.proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
