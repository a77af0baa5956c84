"""The search stage of one lake, measured in a fresh process (so its resident memory is this lake's): images of
the lake searched by id (features in hand -> top k with metadata), 1 and 5 query images per measure, then the same
queries by exact brute force for the ratio and recall@k, and the end-to-end uploads.

Run by the runner as ``python -m imgrec.bench.search --lake DIR ...``; the result is one JSON line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgrec.bench.common import Log, child_main, make_logger, memory, stats
from imgrec.measures import MEASURES

EXPANDING = ("embedding", "color", "mix")  # measures query expansion can change (colour: its layout)
VARIANT_KW: dict[str, dict[str, Any]] = {"default": {}, "no_expand": {"expand": False}}
EXHAUSTIVE_QUERIES = 30  # queries per row whose recall needs the exhaustive engine (mix, expansion): ~1 s each at 400k
AGREEMENT_QUERIES = 5  # queries per row checking that numpy's exact top k is the exhaustive engine's


def variants(engine: Any, measure: str) -> list[tuple[str, dict[str, Any]]]:
    """("default", {}) -- as the app searches -- and, where the engine has query expansion and the measure uses
    the embedding, ("no_expand", {"expand": False}): the index alone, for the recall of the approximate search."""
    out = ["default"]
    if measure in EXPANDING and "expand" in inspect.signature(engine.search).parameters:
        out.append("no_expand")
    return [(v, VARIANT_KW[v]) for v in out]


class Exhaustive:
    """The engine itself with every image of the lake as a candidate: the exact answer the index approximates.

    A search filtered to all the lake's collections is an exact scan of every image (``Config.exact_filter_limit``
    raised to the lake's size), then the same re-rank, expansion, normalisation and aggregation as any search: the
    ground truth of recall@k stays right whatever the scoring becomes. A second engine, opened after the memory of
    the measured one was read. It is slow (it gathers every row per query), so it judges the searches numpy cannot
    (mix, query expansion) on a sample, and checks numpy's answer for the plain distances on a few queries.
    """

    def __init__(self, lake: Path, n: int) -> None:
        from imgrec.config import Config
        from imgrec.search import Engine

        cfg = Config.load(lake)
        self.engine = Engine(cfg.with_(exact_filter_limit=max(cfg.exact_filter_limit, n)), auto_index=False)
        self.collections = [c for (c,) in self.engine.cursor().execute(
            "SELECT DISTINCT collection FROM images ORDER BY 1").fetchall()]

    def search(self, qs: list[int], measure: str, k: int, variant: str) -> list[tuple[int, float]]:
        resp = self.engine.search(qs, measure=measure, k=k, exclude_query=True, collections=self.collections,
                                  with_metadata=False, details=False, **VARIANT_KW[variant])
        return [(r.image_id, r.score) for r in resp.results]

    def close(self) -> None:
        self.engine.close()


def recall_by_score(found: Sequence[tuple[int, float]], best: Sequence[tuple[int, float]], k: int,
                    eps: float = 1e-5) -> float:
    """Share of the exact top ``k`` (``best``) that the search found, ties counted: a result scoring at least the
    exact k-th score is one of the top k (both scores are the engine's exact re-rank of the same query)."""
    want = min(k, len(best))
    if want == 0:
        return 1.0
    kth = best[want - 1][1]
    return min(sum(1 for _, s in list(found)[:k] if s >= kth - eps), want) / want


def related_groups(engine: Any, rng: np.random.Generator, count: int, size: int = 5, pool: int = 20
                   ) -> list[list[int]]:
    """Groups of ``size`` related images, as a person picks them: a random image of the lake and ``size - 1`` drawn
    from its ``pool`` nearest by embedding (the engine's own search, without expansion). Unrelated random images
    would make a query no one asks (nothing is close to all of them)."""
    idx = engine.index
    kw = {"expand": False} if "expand" in inspect.signature(engine.search).parameters else {}
    out = []
    for seed in rng.choice(idx.ids, size=count, replace=count > idx.size):
        near = [r.image_id for r in engine.search([int(seed)], measure="embedding", k=pool, exclude_query=True,
                                                  with_metadata=False, details=False, **kw).results]
        picks = rng.choice(near, size=min(size - 1, len(near)), replace=False) if near else []
        out.append([int(seed), *map(int, picks)])
    return out


def bench_search(lake: Path, *, measures: Sequence[str] = MEASURES, queries1: int = 20, queries5: int = 8,
                 k: int = 10, seed: int = 0, photos: Sequence[Path] = (), e2e1: int = 0, e2e5: int = 0,
                 log: Log | None = None) -> dict[str, Any]:
    """Search-stage latency (engine and exact), recall@k and memory of one lake; end to end when photos are given."""
    from imgrec.bench.exact import Exact, recall_at_k
    from imgrec.config import Config
    from imgrec.search import Engine

    log = log or make_logger()

    mem: dict[str, dict[str, float]] = {"start": memory()}
    t0 = time.perf_counter()
    engine = Engine(Config.load(lake), auto_index=False)
    open_ms = round((time.perf_counter() - t0) * 1000.0, 1)
    idx = engine.index
    if idx is None or idx.size == 0:
        raise ValueError(f"the lake {lake} has no index or no images")
    n = idx.size
    mem["open"] = memory()
    rng = np.random.default_rng(seed)
    singles = [[int(i)] for i in rng.choice(idx.ids, size=queries1, replace=queries1 > n)]
    groups = related_groups(engine, rng, queries5)
    query_sets = {1: singles, 5: groups}
    out: dict[str, Any] = {"n": n, "lake": str(lake), "index_path": str(idx.path), "open_ms": open_ms, "k": k,
                           "expand_supported": "expand" in inspect.signature(engine.search).parameters,
                           "space": idx.meta.get("space"), "embedding_dims": int(idx.embeddings.shape[1])}
    runs: list[dict[str, Any]] = []
    found: dict[tuple[str, int, str], list[list[tuple[int, float]]]] = {}  # (id, score) per query
    if queries1 or queries5:
        t0 = time.perf_counter()
        if hasattr(engine, "prepare"):  # a warm engine, as the app's: the near-duplicate table built
            engine.prepare(wait=True)
        for m in measures:  # the first search restores the HNSW graphs (memory-mapped)
            engine.search(singles[0] if singles else groups[0], measure=m, k=k, exclude_query=True)
        out["first_searches_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        for m in measures:
            for variant, kw in variants(engine, m):
                for images, qsets in query_sets.items():
                    if not qsets:
                        continue
                    totals, walls, stages, ids = [], [], defaultdict(list), []
                    for qs in qsets:
                        t = time.perf_counter()
                        resp = engine.search(qs, measure=m, k=k, exclude_query=True, **kw)
                        walls.append((time.perf_counter() - t) * 1000.0)
                        totals.append(resp.timings_ms["total"])
                        for s, v in resp.timings_ms.items():
                            if s != "total":
                                stages[s].append(v)
                        ids.append([(r.image_id, r.score) for r in resp.results])
                    found[(m, images, variant)] = ids
                    runs.append({"measure": m, "variant": variant, "images": images, "queries": len(qsets),
                                 "total_ms": stats(totals), "wall_ms": stats(walls),
                                 "stages_p50_ms": {s: stats(v)["p50"] for s, v in stages.items()}})
                    log(f"  N={n:,} {m:9s} {variant:9s} {images} image(s): p50 {runs[-1]['total_ms']['p50']:.2f} ms")
        mem["searched"] = memory()
    if photos and (e2e1 or e2e5):
        from imgrec.bench.e2e import bench_e2e

        try:
            out["e2e"] = bench_e2e(engine, photos, measures, e2e1, e2e5, log=log)
        except Exception as exc:  # reported; the search stage's figures still count
            out["e2e_error"] = f"{type(exc).__name__}: {exc}"
            log(f"  end to end failed: {out['e2e_error']}")
        mem["e2e"] = memory()
    if runs:
        log(f"  N={n:,}: the same queries by exact search")
        exact = Exact(idx, engine.config)
        out["exact_load_ms"] = exact.load_ms
        truth = Exhaustive(lake, n)
        for m in measures:
            plain = "no_expand" if any(v == "no_expand" for v, _ in variants(engine, m)) else "default"
            log(f"  N={n:,} exact {m}")
            for images, qsets in query_sets.items():
                mine = [r for r in runs if r["measure"] == m and r["images"] == images]
                if not qsets or not mine:
                    continue
                times, recalls, agree = [], defaultdict(list), []
                for j, qs in enumerate(qsets):
                    t = time.perf_counter()
                    top, scores = exact.search(m, qs, k)
                    engine.lookup_ids(top.tolist())  # the same metadata the engine attaches
                    times.append((time.perf_counter() - t) * 1000.0)
                    for r in mine:
                        got = found[(m, images, r["variant"])][j]
                        if m != "mix" and r["variant"] == plain:  # a plain distance: numpy ranks as the engine
                            recalls[r["variant"]].append(recall_at_k([i for i, _ in got], scores, exact.ids,
                                                                     exact.rows_of, k))
                            if j < AGREEMENT_QUERIES:  # ... checked against the exhaustive engine
                                best = truth.search(qs, m, k, r["variant"])
                                agree.append(recall_at_k([i for i, _ in best], scores, exact.ids, exact.rows_of, k))
                        elif j < EXHAUSTIVE_QUERIES:  # mix, expansion: the exhaustive engine (slow: a sample)
                            recalls[r["variant"]].append(recall_by_score(got, truth.search(qs, m, k, r["variant"]),
                                                                         k))
                brute = stats(times)
                for r in mine:
                    r["exact_ms"] = brute
                    r["speedup_p50"] = round(brute["p50"] / r["total_ms"]["p50"], 1) if r["total_ms"]["p50"] else None
                    r["recall"] = round(float(np.mean(recalls[r["variant"]])), 4)
                    r["recall_min"] = round(float(np.min(recalls[r["variant"]])), 4)
                    r["recall_queries"] = len(recalls[r["variant"]])
                    if agree and r["variant"] == plain:
                        r["numpy_agreement"] = round(float(np.mean(agree)), 4)
        truth.close()
        mem["exact"] = memory()
    out["runs"] = runs
    out["memory_mb"] = mem
    log(f"  N={n:,}: done")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imgrec.bench.search")
    p.add_argument("--lake", required=True, type=Path)
    p.add_argument("--measures", default=",".join(MEASURES))
    p.add_argument("--queries1", type=int, default=20)
    p.add_argument("--queries5", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", type=Path, help="a JSON list of photo files to upload (end to end)")
    p.add_argument("--e2e1", type=int, default=0)
    p.add_argument("--e2e5", type=int, default=0)
    args = p.parse_args(argv)
    photos = [Path(x) for x in json.loads(args.photos.read_text())] if args.photos else []
    return child_main(lambda: bench_search(
        args.lake, measures=[m for m in args.measures.split(",") if m], queries1=args.queries1,
        queries5=args.queries5, k=args.k, seed=args.seed, photos=photos, e2e1=args.e2e1, e2e5=args.e2e5))


if __name__ == "__main__":
    sys.exit(main())
