"""Scale test of the projection without a 400k-image lake: synthetic feature rows made from a real lake's vectors.

Row i of the synthetic set is real row ``i % N`` plus Gaussian noise: embeddings get N(0, ``sigma``) per dimension
and are L2-normalised again (sigma 0.005 over 1280 dims: a noise vector of norm ~0.18, cosine ~0.98 to its source);
colour histograms are multiplied by (1 + N(0, 0.1)) per bin, clipped at 0 and L1-normalised again. The rows are
written as a float16 memory map (like the search index) and ``pipelines.project.fit_arrays`` runs on it: fit on the
sample, transform the rest in batches, k-means. Prints one JSON line: stage timings, peak RSS.

    python -m pipelines.bench_projection --lake /tmp/shared-lake --n 400000 --features embedding --method umap
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic(source: np.ndarray, n: int, features: str, out: Path, seed: int = 0, sigma: float = 0.005,
              chunk: int = 50_000) -> np.ndarray:
    """An n-row float16 memory map at ``out``: real rows plus noise, re-normalised (see the module docstring)."""
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16 if features == "embedding" else np.float32,
                                   shape=(n, source.shape[1]))
    for s in range(0, n, chunk):
        base = np.asarray(source[np.arange(s, min(n, s + chunk)) % len(source)], np.float32)
        if features == "embedding":
            v = base + rng.normal(0.0, sigma, base.shape).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        else:
            v = np.maximum(base * (1.0 + rng.normal(0.0, 0.1, base.shape).astype(np.float32)), 0.0)
            v /= np.maximum(v.sum(1, keepdims=True), 1e-12)
        mm[s:s + len(v)] = v
    mm.flush()
    return np.load(out, mmap_mode="r")


def main(argv: list[str] | None = None) -> int:
    from imgrec.index import IndexSet
    from imgrec.lake import Lake
    from pipelines.project import Params, fit_arrays

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", required=True, help="a lake with a search index (the real vectors)")
    p.add_argument("--n", type=int, default=400_000)
    p.add_argument("--features", choices=("embedding", "color"), default="embedding")
    p.add_argument("--method", choices=("umap", "pca", "tsne"), default="umap")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--sample", type=int, default=Params.sample)
    p.add_argument("--tmp", default=tempfile.gettempdir())
    args = p.parse_args(argv)
    idx = IndexSet.open(Lake(args.lake))
    source = idx.embeddings if args.features == "embedding" else idx.color
    t = time.perf_counter()
    path = Path(args.tmp) / f"synthetic-{args.features}-{args.n}.npy"
    x = synthetic(source, args.n, args.features, path)
    make_s = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    fit = fit_arrays(x, args.features, Params(method=args.method, dims=args.dims, sample=args.sample),
                     progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr, flush=True))
    total = time.perf_counter() - t
    print(json.dumps({
        "n": args.n, "features": args.features, "method": args.method, "dims": args.dims, "sample": args.sample,
        "fitted_on": fit.fitted_on, "make_synthetic_s": round(make_s, 1),
        "timings_s": {k: round(v, 1) for k, v in fit.timings.items()}, "total_s": round(total, 1),
        "peak_rss_mb_before_fit": round(rss0), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "clusters": int(fit.clusters.max()) + 1, "finite": bool(np.isfinite(fit.coords).all()),
    }))
    path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
