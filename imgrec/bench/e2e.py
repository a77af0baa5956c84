"""End to end, warm: image bytes in -> 5 results with paths and thumbnails out, per measure, for 1 and 5 uploaded
real photos, with the engine's stage breakdown plus the thumbnail fetch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgrec.bench.common import Log, stats
from imgrec.bench.source import unique_upload

STAGES = ("setup", "decode", "features", "candidates", "rerank", "metadata", "thumbnails", "other")


def bench_e2e(engine: Any, photos: Sequence[Path], measures: Sequence[str], reps1: int, reps5: int, *, k: int = 5,
              log: Log = lambda s: None) -> dict[str, Any]:
    """Uploads of real photos searched on a warm engine (model loaded, graphs restored by a first search).

    Every upload is made distinct (see ``unique_upload``), so each one is decoded and embedded: the engine's cache
    of recent uploads never answers. ``wall_ms`` runs from the bytes in hand to the thumbnails in hand.
    """
    blobs = [p.read_bytes() for p in photos]
    if not blobs:
        raise ValueError("no photos to upload")
    made = [0]

    def uploads(count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            out.append(unique_upload(blobs[made[0] % len(blobs)], made[0]))
            made[0] += 1
        return out

    t0 = time.perf_counter()
    for m in measures:  # warm: model loaded, HNSW graphs restored, DuckDB caches filled
        engine.search(uploads(1), measure=m, k=k)
    warm_ms = round((time.perf_counter() - t0) * 1000.0, 1)
    rows = []
    for m in measures:
        for images, reps in ((1, reps1), (5, reps5)):
            if reps <= 0:
                continue
            walls, totals, stages = [], [], defaultdict(list)
            for _ in range(reps):
                data = uploads(images)
                t0 = time.perf_counter()
                resp = engine.search(data, measure=m, k=k)
                t1 = time.perf_counter()
                thumbs = engine.thumbnails([r.image_id for r in resp.results])
                t2 = time.perf_counter()
                if len(resp.results) != min(k, engine.size) or not all(r.path for r in resp.results) or \
                        len(thumbs) != len(resp.results):
                    raise AssertionError(f"{m}: {len(resp.results)} results, {len(thumbs)} thumbnails, paths "
                                         f"{[r.path for r in resp.results]}")
                wall = (t2 - t0) * 1000.0
                walls.append(wall)
                totals.append(resp.timings_ms["total"])
                for s, v in resp.timings_ms.items():
                    if s != "total":
                        stages[s].append(v)
                stages["thumbnails"].append((t2 - t1) * 1000.0)
                stages["other"].append(max(wall - resp.timings_ms["total"] - (t2 - t1) * 1000.0, 0.0))
            rows.append({
                "measure": m, "images": images, "reps": reps, "wall_ms": stats(walls), "engine_ms": stats(totals),
                "stages_p50_ms": {s: stats(stages[s])["p50"] for s in STAGES if s in stages}
                | {s: stats(v)["p50"] for s, v in stages.items() if s not in STAGES},
            })
            log(f"  e2e {m:9s} {images} upload(s): p50 {rows[-1]['wall_ms']['p50']:.1f} ms")
    return {"photos": len(blobs), "photo_kb_mean": round(sum(map(len, blobs)) / len(blobs) / 1024.0, 1),
            "k": k, "warm_up_ms": warm_ms, "model_load_ms": engine.startup_ms.get("model_load"), "rows": rows}
