"""Synthetic lakes of N images made from a source lake's real features, written through the real LakeWriter and
indexed by the real ``build_indexes``, so Parquet, DuckDB and usearch do the work they would on N real photos.

Row ``i`` copies the features of source row ``perm[i mod n]`` (``perm``: a seeded permutation of the n source
images). The first pass (``i < n``) keeps the real features unchanged; every later row is a perturbed copy:

- embedding: the real vector plus Gaussian noise shaped like the collection itself (drawn in the span of the source
  embeddings' top 256 principal axes, each with its own variance), scaled so that a copy is about as close to its
  source as a real photo is to its nearest real neighbour (median cosine, measured on the source), then
  re-normalised. Isotropic noise would instead push every copy off the data's manifold into directions no photo
  varies in, which PCA-whitening would then amplify;
- colour histogram: multiplied bin by bin by ``1 + N(0, 0.1)``, clipped at 0 and L1-normalised again;
- perceptual hashes: 0 to 4 random bits of each 64-bit hash flipped;
- metadata: the source's collection and folder under a ``synthetic`` collection, its size, date, dimensions, format
  and labels, a unique content hash and a fake path (there is no file); thumbnails are real ones of the source,
  repeated.

Lakes are cached under the work folder keyed by source, N, seed and this module's version, made in a temporary
folder and renamed when complete. ``bench.json`` in the lake records how it was made and how its index was built.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgrec.bench.common import (
    Log,
    child_main,
    digest,
    dir_bytes,
    index_fingerprint,
    make_logger,
    memory,
    publish_dir,
    tmp_dir_for,
)

SYNTH_VERSION = 1
CHUNK = 50_000  # rows per commit
NOISE_RANK = 256  # principal axes the embedding noise is drawn in
HIST_NOISE = 0.1
MAX_BIT_FLIPS = 4
THUMBS = 256  # distinct real thumbnails repeated over the rows
META = "bench.json"


@dataclass
class SourceFeatures:
    manifest: Any
    emb: np.ndarray  # (n, d) float32, the model's vectors
    hist: np.ndarray  # (n, bins) float32
    hashes: np.ndarray  # (n, 2) uint64
    layout: np.ndarray | None  # (n, 928) float32, the colour layout (None: a source lake ingested before it)
    meta: Any  # polars DataFrame: collection, folder, size_bytes, mtime_ns, width, height, format, mode, labels
    thumbs: list[bytes]

    @property
    def n(self) -> int:
        return int(self.emb.shape[0])


def read_source(lake: Path) -> SourceFeatures:
    """The current images of a lake with their raw features (Parquet, not the index: the model's own vectors)."""
    from imgrec.lake import Lake

    src = Lake(lake)
    manifest = src.manifest()
    if manifest is None:
        raise FileNotFoundError(f"there is no lake at {lake}")
    conn = src.connect(manifest)
    try:
        df = conn.frame(
            "SELECT i.image_id, i.collection, i.folder, i.size_bytes, i.mtime_ns, i.width, i.height, i.format, "
            "i.mode, l.label, l.labels, l.probs, e.vector, c.hist, h.phash, h.dhash, cl.vector AS layout FROM images i "
            "JOIN embeddings e USING (image_id) JOIN color c USING (image_id) JOIN hashes h USING (image_id) "
            "LEFT JOIN labels l USING (image_id) LEFT JOIN color_layout cl USING (image_id) ORDER BY image_id")
        thumbs = [bytes(t) for (t,) in conn.sql(
            f"SELECT thumb FROM thumbnails WHERE image_id IN (SELECT image_id FROM images) ORDER BY image_id "
            f"LIMIT {THUMBS}")]
    finally:
        conn.close()
    if df.height == 0:
        raise ValueError(f"the lake {lake} has no images")
    dim, bins = int(manifest.model["dim"]), manifest.bins
    emb = df["vector"].explode().to_numpy().astype(np.float32).reshape(df.height, dim)
    hist = df["hist"].explode().to_numpy().astype(np.float32).reshape(df.height, bins)
    hashes = np.stack([df["phash"].to_numpy(), df["dhash"].to_numpy()], axis=1).astype(np.uint64)
    layout = None
    if df["layout"].null_count() == 0:
        from imgrec.lake import LAYOUT_DIMS

        layout = df["layout"].explode().to_numpy().astype(np.float32).reshape(df.height, LAYOUT_DIMS)
    meta = df.drop("vector", "hist", "phash", "dhash", "layout", "image_id")
    return SourceFeatures(manifest, emb, hist, hashes, layout, meta, thumbs or [b""])


def nearest_cosine(E: np.ndarray, sample: int = 500, seed: int = 0) -> float:
    """Median cosine of a real image to its nearest other real image (unit rows)."""
    from imgrec import similarity as sim

    n = E.shape[0]
    if n < 2:
        return 0.9
    X = sim.l2_normalize(E)
    rows = np.random.default_rng(seed).choice(n, min(sample, n), replace=False)
    S = X[rows] @ X.T
    S[np.arange(rows.size), rows] = -np.inf
    return float(np.median(S.max(axis=1)))


def noise_basis(E: np.ndarray, rank: int = NOISE_RANK, seed: int = 0) -> np.ndarray:
    """(r, d): rows ``sqrt(var_k) * axis_k`` of the top principal axes, scaled so ``E||z @ basis||^2 = 1``."""
    rng = np.random.default_rng(seed)
    X = E[rng.choice(E.shape[0], min(E.shape[0], 10_000), replace=False)].astype(np.float32)
    X -= X.mean(axis=0)
    m = max(X.shape[0] - 1, 1)
    if X.shape[0] < X.shape[1]:  # few images: the thin SVD of the rows (cheaper than the d x d eigenproblem)
        _, S, Vt = np.linalg.svd(X, full_matrices=False)
        w, axes = S**2 / m, Vt
    else:
        w, V = np.linalg.eigh(X.T @ X / m)
        w, axes = w[::-1], V[:, ::-1].T
    keep = min(rank, int(np.sum(w > 1e-9 * max(float(w.max()), 1e-30))))
    w, axes = np.maximum(w[:keep], 0.0), axes[:keep]
    basis = np.sqrt(w)[:, None] * axes
    return (basis / np.sqrt(max(float(w.sum()), 1e-12))).astype(np.float32)


def _flip_bits(hashes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = hashes.shape[0]
    flips = rng.integers(0, MAX_BIT_FLIPS + 1, (m, 2))
    pos = rng.integers(0, 64, (m, 2, MAX_BIT_FLIPS)).astype(np.uint64)
    bits = np.where(np.arange(MAX_BIT_FLIPS) < flips[:, :, None], np.uint64(1) << pos, np.uint64(0))
    return hashes ^ np.bitwise_or.reduce(bits, axis=2)


def make_rows(src: SourceFeatures, perm: np.ndarray, start: int, end: int, basis: np.ndarray, scale: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Features of rows ``start:end``: (source rows, embeddings, histograms, hashes, colour layouts or None).
    Deterministic per row range."""
    from imgrec import similarity as sim

    rows = np.arange(start, end)
    srow = perm[rows % src.n]
    E, H, X = src.emb[srow].copy(), src.hist[srow].copy(), src.hashes[srow].copy()
    L = src.layout[srow].copy() if src.layout is not None else None
    noisy = rows >= src.n
    m = int(noisy.sum())
    if m:
        rng = np.random.default_rng([seed, start])
        Z = rng.standard_normal((m, basis.shape[0]), dtype=np.float32)
        E[noisy] = sim.l2_normalize(E[noisy] + np.float32(scale) * (Z @ basis))
        jitter = 1.0 + HIST_NOISE * rng.standard_normal((m, H.shape[1]), dtype=np.float32)
        H[noisy] = sim.normalize_histogram(H[noisy] * jitter)
        X[noisy] = _flip_bits(X[noisy], rng)
        if L is not None:
            L[noisy] *= 1.0 + HIST_NOISE * rng.standard_normal((m, L.shape[1]), dtype=np.float32)
            L[noisy] = np.clip(L[noisy], 0.0, None)
    return srow, E, H, X, L


def _frames(src: SourceFeatures, start: int, srow: np.ndarray, E: np.ndarray, H: np.ndarray, X: np.ndarray,
            L: np.ndarray | None, stamp: Any) -> dict[str, Any]:
    import polars as pl

    ids = np.arange(start, start + srow.size, dtype=np.int64)
    meta = src.meta[srow]
    folder = pl.concat_str([pl.lit("synthetic/"), pl.col("collection"), pl.lit("/"), pl.col("folder")]) \
        .str.strip_chars_end("/")
    names = [f"{i:07d}.jpg" for i in ids]
    images = meta.with_columns(
        image_id=pl.Series(ids), version=pl.lit(0, pl.Int64), collection=pl.lit("synthetic"), folder=folder,
        file_name=pl.Series(names, dtype=pl.Utf8), mtime=pl.col("mtime_ns").cast(pl.Datetime("ns")),
        content_hash=pl.Series([f"{i:032x}" for i in ids], dtype=pl.Utf8), ingested_at=pl.lit(stamp),
    ).with_columns(relpath=pl.col("folder") + "/" + pl.col("file_name"))
    return {
        **({"color_layout": pl.DataFrame({"image_id": ids, "vector": L})} if L is not None else {}),
        "images": images,
        "embeddings": pl.DataFrame({"image_id": ids, "vector": E}),
        "color": pl.DataFrame({"image_id": ids, "hist": H}),
        "hashes": pl.DataFrame({"image_id": ids, "phash": X[:, 0], "dhash": X[:, 1]}),
        "labels": meta.select("label", "labels", "probs").with_columns(image_id=pl.Series(ids)),
        "thumbnails": pl.DataFrame({"image_id": ids, "thumb": pl.Series(
            [src.thumbs[int(r) % len(src.thumbs)] for r in srow], dtype=pl.Binary)}),
    }


def lake_path(source: Path, n: int, work: Path, seed: int = 0) -> Path:
    from imgrec.lake import Lake

    src = Lake(source)
    return work / f"synth-{n}-{digest(str(src.root), src.snapshot(), n, seed, SYNTH_VERSION)}"


def synthesize(source: Path, n: int, work: Path, *, seed: int = 0, log: Log | None = None) -> dict[str, Any]:
    """The synthetic lake of ``n`` images made from ``source`` (made once, then cached): how it was made."""
    log = log or make_logger()
    import polars as pl

    from imgrec.lake import Lake, now
    from imgrec.storage import atomic_write_bytes

    final = lake_path(source, n, work, seed)
    if (final / META).is_file():
        info = json.loads((final / META).read_text())["synth"]
        return {**info, "lake": str(final), "cached": True}
    t0 = time.perf_counter()
    src = read_source(source)
    perm = np.random.default_rng(seed).permutation(src.n)
    cos = nearest_cosine(src.emb, seed=seed)
    target = float(np.clip(cos, 0.5, 0.97))
    scale = float(np.sqrt(1.0 / target**2 - 1.0))  # noise norm giving cosine `target` to the source
    basis = noise_basis(src.emb, seed=seed) if n > src.n else np.zeros((1, src.emb.shape[1]), np.float32)
    tmp = tmp_dir_for(final)
    log(f"synthetic lake of {n:,} images from {src.n:,} real ones -> {final}")
    measured: list[float] = []
    with Lake(tmp).writer() as w:
        m = src.manifest
        w.create(m.model, tuple(m.color_bins), m.thumb_size)
        w.commit({"collections": pl.DataFrame({"collection": ["synthetic"], "root": [f"/nonexistent/{final.name}"],
                                               "added_at": [now()]})})
        stamp = now()
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            srow, E, H, X, L = make_rows(src, perm, start, end, basis, scale, seed)
            noisy = np.arange(start, end) >= src.n
            if noisy.any() and len(measured) < 20_000:
                measured.extend(np.einsum("ij,ij->i", E[noisy], _unit(src.emb[srow[noisy]])).tolist())
            w.commit(_frames(src, start, srow, E, H, X, L, stamp), next_image_id=end)
            log(f"  {end:,} / {n:,} rows written")
        w.compact()
    info = {
        "n": n, "seed": seed, "version": SYNTH_VERSION, "source": str(Path(source).resolve()),
        "source_images": src.n, "copies_per_source": round(n / src.n, 2), "real_rows": min(n, src.n),
        "perturbed_rows": max(0, n - src.n), "real_nn_cosine_median": round(cos, 4),
        "target_copy_cosine": round(target, 4), "noise_norm": round(scale, 4), "noise_rank": int(basis.shape[0]),
        "copy_cosine_mean": round(float(np.mean(measured)), 4) if measured else None,
        "hist_noise": HIST_NOISE, "max_bit_flips": MAX_BIT_FLIPS, "seconds": round(time.perf_counter() - t0, 1),
        "lake_bytes": dir_bytes(tmp),
    }
    atomic_write_bytes(tmp / META, json.dumps({"synth": info}, indent=1).encode())
    publish_dir(tmp, final)
    log(f"  made in {info['seconds']} s ({info['lake_bytes'] / 1e6:,.0f} MB)")
    return {**info, "lake": str(final), "cached": False}


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def ensure_index(lake: Path, *, log: Log | None = None) -> dict[str, Any]:
    """Build the lake's index from scratch with ``pipelines.index.build_indexes`` unless one built by the same code
    is there (an index built by other code is removed first, so the build is never an incremental update).

    Returns the build's wall time, its breakdown (the index's ``build_seconds``), peak memory, and the index's size
    on disk per file. Run in a fresh process so that the peak memory is the build's own.
    """
    log = log or make_logger()
    from imgrec.config import Config
    from imgrec.index import current_dir, index_root
    from imgrec.lake import Lake
    from imgrec.storage import atomic_write_bytes
    from pipelines.index import build_indexes

    lake = Path(lake)
    meta_path = lake / META
    record = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    fp = index_fingerprint()
    old = record.get("index") or {}
    current = current_dir(Lake(lake))
    if old.get("fingerprint") == fp and old.get("from_scratch") and current is not None and \
            json.loads((current / "meta.json").read_text())["snapshot"] == Lake(lake).snapshot():
        return {**old, "cached": True}
    log(f"building the index of {lake.name} (build_indexes)")
    shutil.rmtree(index_root(Lake(lake)), ignore_errors=True)  # from scratch: an older index would be updated
    t0 = time.perf_counter()
    meta = build_indexes(Config.load(lake), force=True, log=log)
    seconds = time.perf_counter() - t0
    current = current_dir(Lake(lake))
    assert current is not None
    files = {p.name: p.stat().st_size for p in sorted(current.iterdir()) if p.is_file()}
    info = {
        "fingerprint": fp, "from_scratch": True, "seconds": round(seconds, 2),
        "build_seconds": meta.get("build_seconds", {}),
        "count": meta.get("count"), "space": meta.get("space"), "hnsw": meta.get("hnsw"),
        "peak_rss_mb": memory().get("peak"), "bytes": sum(files.values()), "files": files,
        "built_at": meta.get("built_at"),
    }
    record["index"] = info
    atomic_write_bytes(meta_path, json.dumps(record, indent=1).encode())
    log(f"  index built in {seconds:.1f} s ({info['bytes'] / 1e6:,.0f} MB)")
    return {**info, "cached": False}


def main(argv: list[str] | None = None) -> int:
    """``python -m imgrec.bench.synth make --source LAKE --n N --work DIR`` or ``index --lake LAKE``."""
    p = argparse.ArgumentParser(prog="python -m imgrec.bench.synth")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--source", required=True, type=Path)
    mk.add_argument("--n", required=True, type=int)
    mk.add_argument("--work", required=True, type=Path)
    mk.add_argument("--seed", type=int, default=0)
    ix = sub.add_parser("index")
    ix.add_argument("--lake", required=True, type=Path)
    args = p.parse_args(argv)
    if args.command == "make":
        return child_main(lambda: synthesize(args.source, args.n, args.work, seed=args.seed))
    return child_main(lambda: ensure_index(args.lake))


if __name__ == "__main__":
    sys.exit(main())
