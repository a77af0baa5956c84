"""Side by side, in one process: the search-stage parts that were rewritten for speed, old way vs new way.

    python benchmarks/search_parts.py --lake LAKE [--repeat 30]

- hash candidates: the popcount over the (N, 2) hash matrix summed with ``sum(axis=1)`` after a contiguous copy
  (before) vs one word at a time on the memory-mapped matrix (``similarity.hamming_distance`` now);
- results' metadata for 10 results: DuckDB (``Engine.lookup_ids``, before) vs the index's memory-mapped row table;
- the hash scan on the row-major memory map vs the column-major copy (``IndexSet.hash_columns``);
- mix's near-duplicate candidates of one query image (within 16 of 128 bits): the column-major scan vs the
  multi-index hashing table (``IndexSet.radius_index``, ``imgrec.mih.RadiusIndex``), checked to find the same rows;
- the graph searches of 5 query images: one call each vs one batched call (2 threads), embedding and colour;
- the expansion's 6 nearest of 5 query images: graph search breadth 256 vs 64 (``Config.expand_ef``).
Prints the median ms of each and the ratio; query images are random images of the lake.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def hamming_before(q: np.ndarray, X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.uint64)
    return np.bitwise_count(np.bitwise_xor(X, q.reshape(1, -1))).sum(axis=1, dtype=np.int32)


def main() -> None:
    from imgrec import similarity as sim
    from imgrec.config import Config
    from imgrec.search import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    engine = Engine(Config.load(args.lake), auto_index=False)
    idx = engine.index
    rng = np.random.default_rng(0)
    q = np.asarray(idx.hashes[int(rng.integers(idx.size))])
    assert np.array_equal(hamming_before(q, idx.hashes), sim.hamming_distance(q, idx.hashes))
    rows = np.sort(rng.choice(idx.size, 10, replace=False))
    ids = [int(i) for i in idx.ids[rows]]
    cols = idx.hash_columns
    table = idx.radius_index(slice(0, 2), 16, wait=True)
    if table is not None:
        assert np.array_equal(table.query(q)[0], np.flatnonzero(sim.hamming_distance(q, cols) <= 16))
    five = rng.choice(idx.size, 5, replace=False)
    E = np.asarray(idx.embeddings[np.sort(five)], dtype=np.float32)
    C = np.sqrt(np.asarray(idx.color[np.sort(five)], dtype=np.float32))

    def graph(hnsw: object, X: np.ndarray, k: int, ef: int, batched: bool) -> object:
        hnsw.expansion_search = ef  # type: ignore[attr-defined]
        return hnsw.search(X, k, threads=2) if batched else [hnsw.search(x, k) for x in X]  # type: ignore

    eg, cg = idx.searcher.graph("embedding"), idx.searcher.graph("color")  # one shard's graphs
    pairs = {
        f"hash distances over {idx.size:,} images": (lambda: hamming_before(q, idx.hashes),
                                                     lambda: sim.hamming_distance(q, idx.hashes)),
        "metadata of 10 results": (lambda: engine.lookup_ids(ids), lambda: idx.metadata.take(rows).to_pylist()),
        "hash scan, row-major map vs column-major copy": (lambda: sim.hamming_distance(q, idx.hashes),
                                                          lambda: sim.hamming_distance(q, cols)),
        "near-duplicate candidates (16 bits), scan vs table": (
            lambda: np.flatnonzero(sim.hamming_distance(q, cols) <= 16),
            (lambda: table.query(q)) if table is not None else (lambda: None)),
        "embedding graph, 5 images x 128, one by one vs batched": (
            lambda: graph(eg, E, 128, 256, False), lambda: graph(eg, E, 128, 256, True)),
        "colour graph, 5 images x 128, one by one vs batched": (
            lambda: graph(cg, C, 128, 256, False), lambda: graph(cg, C, 128, 256, True)),
        "expansion neighbours, 5 images x 6, breadth 256 vs 64": (
            lambda: graph(eg, E, 6, 256, True), lambda: graph(eg, E, 6, 64, True)),
    }
    print("| part | before ms | after ms | ratio |\n| --- | --- | --- | --- |")
    for name, (before, after) in pairs.items():
        b, a = median_ms(before, args.repeat), median_ms(after, args.repeat)
        print(f"| {name} | {b:.2f} | {a:.3f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
