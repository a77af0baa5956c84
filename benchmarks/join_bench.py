"""Self-joins of a large lake (the bench's synthetic 400k lake, say): kNN (k=5) under embedding and mix, and the
range join at the near-duplicate threshold (hash, 16 of 128 bits): total time, pairs/s, peak memory of the joining
process, and recall@k against the exact answer on a sample of left images.

    .venv/bin/python benchmarks/join_bench.py --lake ~/.cache/imgrec/bench/synth-400000-*

Each join runs in a fresh process (``--one``), so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(lake: str, measure: str, k: int | None, threshold: float | None, sample: int) -> dict:
    import tempfile

    import pyarrow.parquet as pq

    from imgrec import join as J
    from imgrec.config import Config
    from imgrec.search import Engine, one_blas_thread

    engine = Engine(Config.load(lake))
    t0 = time.perf_counter()
    pairs, lefts, rights = 0, [], []
    with tempfile.TemporaryDirectory() as tmp, one_blas_thread():  # the pairs go to a Parquet file, as the CLI's
        writer = pq.ParquetWriter(f"{tmp}/pairs.parquet", J.schema(), compression="zstd")
        for batch in J.join_pairs(engine, "all", "all", measure, k=k, threshold=threshold, max_pairs=10**9):
            writer.write_batch(batch)
            pairs += batch.num_rows
            if k is not None:
                lefts.append(batch.column("left_id").to_numpy())
                rights.append(batch.column("right_id").to_numpy())
        writer.close()
        out_mb = Path(f"{tmp}/pairs.parquet").stat().st_size / 1e6
    seconds = time.perf_counter() - t0
    out = {"measure": measure, "k": k, "threshold": threshold, "images": engine.size, "pairs": pairs,
           "seconds": round(seconds, 1), "pairs_per_s": round(pairs / seconds), "images_per_s": round(engine.size / seconds),
           "parquet_mb": round(out_mb, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if k is not None and sample:  # recall@k of the pairs each sampled left image is in, against every pair exact
        idx = engine.index
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(idx.size, sample, replace=False))
        left, right = np.concatenate(lefts), np.concatenate(rights)
        weights = {m: v for m, v in engine.config.weights.items() if v > 0}
        hits = []
        every = np.arange(idx.size)
        for r in rows:
            a = int(idx.ids[r])
            got = set(right[left == a].tolist()) | set(left[right == a].tolist())  # listed once, either way round
            per = J.pair_similarities(idx, np.full(idx.size - 1, r), every[every != r])
            score = per[measure] if measure != "mix" else engine.mix(weights).fuse(idx, {m: per[m] for m in weights})[0]
            best = idx.ids[every[every != r][np.argsort(-score, kind="stable")[:k]]]
            mine = set(right[left == a].tolist())
            hits.append(len(set(best.tolist()) & (mine | got)) / k)
        out["recall_at_k"] = round(float(np.mean(hits)), 4)
        out["recall_sample"] = sample
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--one", nargs=3, metavar=("MEASURE", "K", "THRESHOLD"), help=argparse.SUPPRESS)
    ap.add_argument("--which", nargs="+", default=["embedding:5", "mix:5", "hash@0.875"])
    args = ap.parse_args()
    if args.one:
        m, k, t = args.one
        print("RESULT " + json.dumps(one(args.lake, m, int(k) if k != "-" else None, float(t) if t != "-" else None,
                                         args.sample)))
        return
    from imgrec.bench.runner import machine

    print(json.dumps({k: v for k, v in machine().items() if k in ("cpu", "vector_extensions", "cpus", "commit")}))
    for spec in args.which:
        measure, k, t = (spec.split(":")[0], spec.split(":")[1], "-") if ":" in spec else \
            (spec.split("@")[0], "-", spec.split("@")[1])
        proc = subprocess.run([sys.executable, __file__, "--lake", args.lake, "--sample", str(args.sample),
                               "--one", measure, k, t], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        print(line[0][7:] if line else f"{spec} failed: {proc.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
