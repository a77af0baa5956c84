"""Sharded index vs one graph per measure, on the bench's synthetic lake of N images (real features, perturbed):
per shard count, the graphs' build time (``pipelines.index.build_shards``, parallel processes), memory per shard
(bytes on disk, what a serving process maps), the graphs' kNN p50/p95 (the engine's 128 candidates, breadth 256;
each shard asked for its share, ``searchers.per_shard``, and for all 128: ``full:``) and the recall@10 of those
candidates against brute force, and the engine's search stage p50/p95 per measure for 1 and 5 query images with
the sharded backend swapped in (same engine, same lake).

    .venv/bin/python benchmarks/shards.py --n 1000000 --shards 1,4,16 --out docs/bench/shards-1M.json

The synthetic lake and its unsharded index are the bench's (``imgrec bench``'s cache); the shard builds go to
``<work>/shards-<N>/<S>/`` beside them and are removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROW_FILES = ("ids.npy", "embeddings.npy", "color.npy", "layout.npy")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))], 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", default="1,4,16")
    ap.add_argument("--queries1", type=int, default=60)
    ap.add_argument("--queries5", type=int, default=20)
    ap.add_argument("--recall-queries", type=int, default=100)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from imgrec.bench.common import default_work, make_logger
    from imgrec.bench.runner import machine
    from imgrec.bench.source import source_lake
    from imgrec.bench.synth import META, ensure_index, synthesize
    from imgrec.config import Config
    from imgrec.index import IndexSet, current_dir
    from imgrec.lake import Lake
    from imgrec.search import Engine
    from imgrec.searchers import open_searcher
    from pipelines.index import GraphSpec, build_shards

    log = make_logger()
    work = args.work or default_work()
    src = source_lake(None, work, log)
    synth = synthesize(src.lake, args.n, work, log=log)
    lake = Path(synth["lake"])
    record = json.loads((lake / META).read_text()).get("index") if (lake / META).is_file() else None
    # the graphs are rebuilt below: an index the bench built before (by code differing elsewhere) serves
    base = record if record and current_dir(Lake(lake)) is not None else ensure_index(lake, log=log)
    snap = current_dir(Lake(lake))
    assert snap is not None
    idx = IndexSet.open(Lake(lake))
    config = Config.load(lake)
    graphs = [GraphSpec("embedding", "embeddings.npy", False, "cos", "f16", False),
              GraphSpec("color", "color.npy", True, "l2sq", "f32", False)]
    if idx.layout is not None:
        graphs.append(GraphSpec("layout", "layout.npy", False, "cos", "f16", False))
    vectors = {"embedding": np.asarray(idx.embeddings, dtype=np.float32),
               "color": np.sqrt(np.asarray(idx.color, dtype=np.float32))}
    if idx.layout is not None:
        vectors["layout"] = np.asarray(idx.layout, dtype=np.float32)
    rng = np.random.default_rng(0)
    n = idx.size
    q_rows = rng.choice(n, args.recall_queries, replace=False)
    truth = {}
    for g, V in vectors.items():  # brute force: the 10 nearest of each query row, over every image
        out = []
        sq = (V * V).sum(axis=1) if g == "color" else None
        for r in q_rows:
            d = sq - 2 * (V @ V[r]) if sq is not None else -(V @ V[r])  # L2 squared (plus a constant), or -cosine
            top = np.argpartition(d, 10)[:10]
            out.append(set(idx.ids[top].tolist()))
        truth[g] = out
    log(f"brute force done ({len(q_rows)} queries per graph)")

    report: dict[str, Any] = {"machine": machine(), "n": n, "lake": str(lake), "synth": synth,
                              "unsharded_index_build": base, "config": {
                                  "connectivity": config.hnsw_connectivity, "expansion_add": config.hnsw_expansion_add,
                                  "candidates": config.candidates, "expansion_search": config.hnsw_expansion_search},
                              "runs": []}
    seeds1 = rng.choice(n, args.queries1, replace=False).tolist()
    seeds5 = [rng.choice(n, 5, replace=False).tolist() for _ in range(args.queries5)]
    for S in [int(s) for s in args.shards.split(",")]:
        out = work / f"shards-{n}" / str(S)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in ROW_FILES:
            if (snap / f).is_file():
                os.symlink(snap / f, out / f)
        log(f"{S} shard(s): building")
        t0 = time.perf_counter()
        meta = build_shards(out, None, None, idx.meta["model"], np.asarray(idx.ids), graphs, config, S,
                            processes=True, log=log)
        build_s = time.perf_counter() - t0
        searcher: Any = open_searcher(out)
        per_shard = [sum(f.stat().st_size for f in (out / f"shard-{i:03d}").iterdir()) for i in range(S)]
        run: dict[str, Any] = {"shards": S, "build_seconds": round(build_s, 2), "parallel": meta["parallel"],
                               "images_per_shard": meta["images"], "graph_bytes_per_shard_max": max(per_shard),
                               "graph_bytes_total": sum(per_shard), "knn": {}, "recall_at_10": {}, "search": {}}
        policies = [("", False)] + ([("full:", True)] if S > 1 else [])  # full: every shard asked for all 128
        for g, V in vectors.items():
            searcher.warm(g)
            for tag, full in policies:
                searcher.full = full
                found = [set(searcher.knn(g, V[r : r + 1], config.candidates, config.hnsw_expansion_search,
                                          1).keys[0, :10].tolist()) for r in q_rows]
                run["recall_at_10"][tag + g] = round(float(np.mean([len(a & b) / 10 for a, b in zip(
                    found, truth[g], strict=True)])), 4)
                for nq, batches in (("1", [[r] for r in seeds1]), ("5", seeds5)):
                    ms = []
                    for rows in batches:
                        t = time.perf_counter()
                        searcher.knn(g, V[rows], config.candidates, config.hnsw_expansion_search, min(len(rows), 2))
                        ms.append((time.perf_counter() - t) * 1e3)
                    run["knn"][f"{tag}{g}/{nq}"] = {"p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95)}
            searcher.full = False
        engine = Engine(config)
        engine.index.__dict__["searcher"] = searcher  # the same engine and lake, the graph searches through S shards
        for measure in ("color", "hash", "embedding", "mix"):
            for nq, batches in (("1", [[r] for r in seeds1]), ("5", seeds5)):
                ms = []
                for rows in batches:
                    resp = engine.search([int(idx.ids[r]) for r in rows], measure, 10)
                    ms.append(resp.timings_ms["total"])
                run["search"][f"{measure}/{nq}"] = {"p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95),
                                                    "median_ms": round(statistics.median(ms), 3)}
        engine.close()
        del searcher
        shutil.rmtree(out, ignore_errors=True)
        log(f"{S} shard(s): build {build_s:.1f} s, recall {run['recall_at_10']}, "
            f"mix/1 p50 {run['search']['mix/1']['p50_ms']} ms")
        report["runs"].append(run)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
