"""`--engine ray` against `--engine local` on the same photos, side by side, and Ray on a simulated cluster.

Each run ingests the photos into a fresh temporary lake (`--no-index`) through the CLI in a subprocess; the variants
are interleaved (one repetition of each, then the next), so load that comes and goes hits them alike. Variants:

- ``local``: the default engine (worker processes, ONNX Runtime in each).
- ``ray-cold``: ``--engine ray`` without ``--address``: the command starts a local Ray instance and stops it.
- ``ray``: ``--engine ray --address`` of a Ray instance on this machine started once beforehand (a cluster that is
  up, as it is for its users): the per-run cost of Ray without its start.
- ``ray-2nodes``: the same on a ``ray.cluster_utils.Cluster`` of a head with no CPU and 2 worker nodes of 1 CPU
  each (this machine's 2 cores as 2 nodes: what the multi-node machinery costs, not a speed-up).
- ``ray-split``: ``ray`` with the split stages (CPU tasks decode, an actor embeds: what a GPU cluster runs).

images/s is the command's wall time over the images (``wall_ips``: Ray's start included where the variant pays it)
and the report's ``images_per_s``. Exits with a message where ../shared/data is absent.

    .venv/bin/python benchmarks/ingest_ray.py --reps 3            # Flowers-17 (1,360 photos)
    .venv/bin/python benchmarks/ingest_ray.py --limit 400 --reps 1
    .venv/bin/python benchmarks/ingest_ray.py --photos ../shared/data/dogs_vs_cats_200px --variants local,ray-cold
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17" / "images"


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that change these figures."""
    name, flags = platform.processor(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    ext = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(ext)})"


def run_once(photos: Path, extra: list[str]) -> dict:
    lake = Path(tempfile.mkdtemp(prefix="ingest-ray-"))
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(photos), "--lake", str(lake), "--no-index", "--quiet",
           "--json", *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    finally:
        shutil.rmtree(lake, ignore_errors=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'local'} failed: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_ips": report["processed"] / wall, "ips": report["images_per_s"], "n": report["processed"],
            "wall": wall, "stages": report["stages"], "workers": report["workers"],
            "actors": report.get("embed_actors", 0), "nodes": report.get("nodes", 1)}


def subset(limit: int) -> Path:
    if not limit:
        return DATA
    out = Path(tempfile.mkdtemp(prefix="ingest-ray-photos-"))
    for i, src in enumerate(sorted(DATA.rglob("*.jpg"))[:limit]):
        dst = out / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
        if i + 1 >= limit:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="photos (0: all of Flowers-17)")
    ap.add_argument("--photos", type=Path, help="another folder of photos (default: Flowers-17)")
    ap.add_argument("--variants", default="local,ray-cold,ray,ray-split,ray-2nodes")
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to measure", file=sys.stderr)
        return 1
    # every node and driver on 127.0.0.1 (Ray's multi-node switch off: else ray.init turns 127.0.0.1 into the
    # machine's outward address); the CLI processes inherit it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster

    photos = args.photos or subset(args.limit)
    variants = args.variants.split(",")
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 512 * 1024**2}
    single = two = None
    if {"ray", "ray-split"} & set(variants):
        single = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False,
                                                               **node})
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for rep in range(args.reps):
            for v in variants:
                if v == "ray-2nodes" and two is None:
                    if single is not None:
                        single.shutdown()
                        single = None
                        ray.shutdown()
                    two = Cluster(initialize_head=True,
                                  head_node_args={"num_cpus": 0, "include_dashboard": False, **node})
                    for _ in range(2):
                        two.add_node(num_cpus=1, **node)
                    two.wait_for_nodes()
                if v in ("ray", "ray-split") and single is None:
                    continue  # after the 2-node cluster replaced it (one cluster at a time on 2 cores)
                extra = {"local": [], "ray-cold": ["--engine", "ray"],
                         "ray": ["--engine", "ray", "--address", single.address if single else ""],
                         "ray-split": ["--engine", "ray", "--ray-stages", "split", "--address",
                                       single.address if single else ""],
                         "ray-2nodes": ["--engine", "ray", "--address", two.address if two else ""]}[v]
                r = run_once(photos, extra)
                runs[v].append(r)
                print(f"rep {rep} {v:11s} {r['n']} images: {r['wall_ips']:6.1f} img/s wall ({r['wall']:.1f} s), "
                      f"{r['ips']:6.1f} in the report; workers {r['workers']}, actors {r['actors']}", flush=True)
            if two is not None:  # the 2-node cluster once per repetition, then back to the single instance
                two.shutdown()
                two = None
                if {"ray", "ray-split"} & set(variants):
                    single = Cluster(initialize_head=True, head_node_args={
                        "num_cpus": os.cpu_count(), "include_dashboard": False, **node})
    finally:
        for c in (single, two):
            if c is not None:
                c.shutdown()
    summary = {}
    base = statistics.median(r["wall_ips"] for r in runs["local"]) if runs.get("local") else None
    for v, rs in runs.items():
        if not rs:
            continue
        med = statistics.median(r["wall_ips"] for r in rs)
        stages = {k: round(statistics.median(r["stages"].get(k, 0.0) for r in rs), 2) for k in rs[0]["stages"]}
        summary[v] = {"wall_ips_median": round(med, 1), "report_ips_median": round(statistics.median(
            r["ips"] for r in rs), 1), "vs_local": round(med / base, 3) if base else None, "runs": len(rs),
            "stages_s": stages}
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "images": runs[variants[0]][0]["n"], "summary": summary}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
