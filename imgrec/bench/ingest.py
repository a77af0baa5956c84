"""Ingestion throughput on real photos: ``imgrec ingest`` into a new, empty lake, run as a user runs it (a new
process), with 1 and 2 worker processes; images/s and the per-stage breakdown of its report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imgrec.bench.common import BenchError, Log, child_env
from imgrec.bench.source import image_files, subset

STAGES = ("scan", "read", "decode", "color", "hash", "thumbnail", "preprocess", "model_load", "embed", "write",
          "compact", "index")
WORKER_STAGES = ("read", "decode", "color", "hash", "thumbnail", "preprocess")  # summed over workers (CPU time)


def bench_ingest(name: str, root: Path, workers: int, work: Path, limit: int = 0, *, timeout: float = 7200.0,
                 log: Log = lambda s: None) -> dict[str, Any]:
    """Ingest ``limit`` images of ``root`` (all with 0) into a new lake with ``workers`` processes."""
    folder = subset(root, limit, work / f"ingest-subset-{name}-{limit}")
    lake = work / f"ingest-lake-{name}-{workers}"
    shutil.rmtree(lake, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgrec.cli", "ingest", str(folder), "--lake", str(lake), "--workers",
           str(workers), "--json", "--quiet"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise BenchError(f"ingesting {name} ran past {timeout:.0f} s") from None
    finally:
        shutil.rmtree(lake, ignore_errors=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"imgrec ingest {name} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    rep = json.loads(proc.stdout)
    n = int(rep["processed"])
    st = {k: float(v) for k, v in rep.get("stages", {}).items()}
    steady_s = rep["seconds"] - st.get("model_load", 0.0) - st.get("scan", 0.0)
    out = {
        "set": name, "root": str(root), "images": n, "files": len(image_files(folder)), "workers": rep["workers"],
        "seconds": round(rep["seconds"], 2), "images_per_s": rep["images_per_s"],
        "steady_images_per_s": round(n / steady_s, 2) if steady_s > 0 else None,
        "process_s": round(wall, 2), "device": rep.get("device"), "skipped": rep.get("skipped"),
        "stages_s": {k: round(st[k], 3) for k in STAGES if k in st},
        "ms_per_image": {k: round(st[k] * 1000.0 / n, 2) for k in STAGES if k in st} if n else {},
    }
    if folder != root:
        shutil.rmtree(folder, ignore_errors=True)
    log(f"  ingest {name}: {n} images, {workers} worker(s): {out['images_per_s']} images/s "
        f"(steady {out['steady_images_per_s']})")
    return out
