"""End-to-end `imgrec ingest` throughput: source trees x workers x batch sizes x torch threads, side by side.

Each run ingests the photo folder into a fresh temporary lake (`--no-index`, so the figure is the ingestion alone, as
`images_per_s` in the report) in a subprocess. Runs are interleaved (one repetition of every variant, then the next),
so a load that comes and goes on a shared machine hits all variants alike. Besides the wall-clock images/s it reports
the CPU time of the whole process tree (parent and decoding workers, user + system) per image: the figure that does
not depend on what else the machine runs, and that bounds the throughput of a dedicated machine at
cores / (CPU time per image).

    .venv/bin/python benchmarks/ingest_e2e.py                              # this tree, 1 and 2 workers
    .venv/bin/python benchmarks/ingest_e2e.py --tree before=/tmp/orig --tree after=. --workers 2 --reps 3

A ``--tree`` is a folder holding the ``imgrec`` and ``pipelines`` packages (a copy of another version: run with this
repository's virtual environment). Exits with a message where ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17"


def run_once(tree: Path, photos: Path, workers: int, batch: int, threads: int) -> dict:
    lake = Path(tempfile.mkdtemp(prefix="ingest-e2e-"))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = ["ingest", str(photos), "--lake", str(lake), "--workers", str(workers), "--batch-size", str(batch),
            "--no-index", "--quiet", "--json"]
    if threads:  # torch's default, and the main process's embedding threads (a tree whose CLI has --embed-threads)
        env["OMP_NUM_THREADS"] = str(threads)
        argv += ["--embed-threads", str(threads)]
    code = f"import sys; from imgrec.cli import main; sys.exit(main({argv!r}))"
    cmd = [sys.executable, "-c", code]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(lake, ignore_errors=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(out[out.index("{"):])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ips": report["images_per_s"], "n": report["processed"], "cpu_ms": cpu * 1000 / report["processed"],
            "sys_ms": (after.ru_stime - before.ru_stime) * 1000 / report["processed"], "wall": wall,
            "stages": report["stages"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to run (repeatable; default: this repository)")
    ap.add_argument("--photos", type=Path, default=DATA)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="torch threads: OMP_NUM_THREADS and --embed-threads (0: as the tree does)")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    args.photos = args.photos.resolve()  # the runs start in the tree's folder
    if not args.photos.is_dir():
        sys.exit(f"{args.photos} is absent: the shared data set is needed; nothing to measure")
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(ROOT)}
    variants = list(itertools.product(trees, args.workers, args.batch, args.threads))
    results: dict[tuple, list[dict]] = {v: [] for v in variants}
    print(f"{args.photos}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    for rep in range(args.reps):
        for v in variants:
            name, workers, batch, threads = v
            r = run_once(Path(trees[name]).resolve(), args.photos, workers, batch, threads)
            results[v].append(r)
            print(f"rep {rep} {name:8s} workers {workers} batch {batch:3d} threads {threads or 'default':>7}: "
                  f"{r['ips']:6.1f} img/s, cpu {r['cpu_ms']:5.1f} ms/img (sys {r['sys_ms']:4.1f}), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{'tree':8s} {'workers':>7s} {'batch':>5s} {'threads':>7s} {'img/s':>6s} {'best':>6s} {'cpu ms/img':>10s} "
          f"{'2 cores / cpu':>13s}  stages (s, median run)")
    for v, rs in results.items():
        name, workers, batch, threads = v
        ips = [r["ips"] for r in rs]
        cpu = statistics.median(r["cpu_ms"] for r in rs)
        mid = sorted(rs, key=lambda r: r["ips"])[len(rs) // 2]
        stages = ", ".join(f"{k} {s:.1f}" for k, s in sorted(mid["stages"].items(), key=lambda kv: -kv[1])[:7])
        print(f"{name:8s} {workers:7d} {batch:5d} {threads or 'default':>7} {statistics.median(ips):6.1f} "
              f"{max(ips):6.1f} {cpu:10.1f} {2000 / cpu:13.1f}  {stages}")


if __name__ == "__main__":
    main()
