"""The projection job: a 2D / 3D map of every image (PCA, then UMAP or t-SNE), k-means clusters, and the evaluation
of the maps on labelled sets.

Features come from the memory-mapped search index (``imgrec.index.IndexSet``): the embeddings (L2-normalised, so
Euclidean ranks as cosine) or the square roots of the colour histograms (Euclidean there ranks as Hellinger, the
colour index's geometry). PCA (50 dims) and the reducer are fitted on a fixed random sample (seeded) and every other
image is placed with ``transform`` in batches, so the cost of the fit does not grow with the lake. A later run
``transform``s only the images added since and drops the removed ones; ``refit=True`` starts over. t-SNE has no
``transform``: it runs on the whole set, only up to ``tsne_max`` images, and is refitted when the set changes.

sklearn and umap (numba) are imported inside the functions that use them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec import projection as proj

Log = Callable[[str], None]
FIT_PARAMS = {  # the parameters a fitted map depends on, per method (a change of one of them means a refit)
    "umap": ("pca_dims", "sample", "n_neighbors", "min_dist", "clusters", "seed"),
    "pca": ("pca_dims", "sample", "clusters", "seed"),
    "tsne": ("pca_dims", "perplexity", "clusters", "seed"),
}


class ProjectionRefused(ValueError):
    """The asked map cannot be made here (t-SNE on too many images, too few images, ...)."""


@dataclass(frozen=True)
class Params:
    method: str = "umap"
    dims: int = 2
    pca_dims: int = 50
    sample: int = 30_000  # images the PCA, the reducer and k-means are fitted on; the rest are transformed
    n_neighbors: int = 15
    min_dist: float = 0.1
    perplexity: float = 30.0
    clusters: int = 20
    seed: int = 0
    tsne_max: int = 20_000  # t-SNE (no transform) on at most this many images
    batch: int = 20_000  # rows per transform batch

    def fit_params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in FIT_PARAMS.get(self.method, ())}


@dataclass
class Fitted:
    coords: NDArray[np.float32]  # N x dims
    clusters: NDArray[np.int32]
    reduced: NDArray[np.float32]  # N x pca_dims (for the clusters' representatives)
    model: dict[str, Any]
    fitted_on: int
    timings: dict[str, float] = field(default_factory=dict)


def prepare(rows: NDArray[Any], features: str) -> NDArray[np.float32]:
    """Feature rows in the geometry of the search: embeddings as they are, colour histograms square-rooted."""
    x = np.asarray(rows, dtype=np.float32)
    return np.sqrt(np.maximum(x, 0.0)) if features == "color" else x


def _batches(n: int, size: int, progress: bool, desc: str) -> Any:
    from tqdm import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) <= 1, file=sys.stderr)


def _reduce(pca: Any, x: Any, features: str, batch: int, progress: bool = False) -> NDArray[np.float32]:
    out = np.empty((len(x), pca.n_components_), np.float32)
    for s in _batches(len(x), batch, progress, "pca"):
        out[s:s + batch] = pca.transform(prepare(x[s:s + batch], features))
    return out


def sample_rows(n: int, size: int, seed: int) -> NDArray[np.int64]:
    """A fixed random sample of row positions (sorted): the same for the same n, size and seed."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def fit_arrays(x: Any, features: str, params: Params, *, progress: bool = False, log: Log | None = None) -> Fitted:
    """Fit a map on the rows of ``x`` (N x D, any float dtype, e.g. a memory map): PCA, reducer, k-means on a
    sample, then every row placed in batches. Deterministic for a given ``params.seed``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    log = log or (lambda s: None)
    n = len(x)
    if n < 4:
        raise ProjectionRefused(f"a map needs at least 4 images; the lake has {n}")
    if params.method == "tsne" and n > params.tsne_max:
        raise ProjectionRefused(
            f"t-SNE has no transform, so it must run on all {n:,} images at once; refused above "
            f"{params.tsne_max:,} (minutes and GBs on this machine). Use --method umap, or raise --tsne-max.")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rows = sample_rows(n, n if params.method == "tsne" else params.sample, params.seed)
    xs = prepare(x[rows], features)
    pca = PCA(n_components=min(params.pca_dims, xs.shape[1], len(rows)), random_state=params.seed,
              svd_solver="randomized" if len(rows) > 2000 else "full").fit(xs)
    reduced = _reduce(pca, x, features, params.batch, progress)
    timings["pca"] = time.perf_counter() - t

    t = time.perf_counter()
    reducer: Any = None
    coords = np.empty((n, params.dims), np.float32)
    if params.method == "pca":
        coords[:] = reduced[:, :params.dims]
    elif params.method == "umap":
        import warnings

        import umap

        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        reducer = umap.UMAP(n_components=params.dims, n_neighbors=max(2, min(params.n_neighbors, len(rows) - 1)),
                            min_dist=params.min_dist, random_state=params.seed, transform_seed=params.seed,
                            init="spectral" if len(rows) > params.dims + 2 else "random")
        coords[rows] = reducer.fit_transform(reduced[rows])
    elif params.method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=params.dims, perplexity=min(params.perplexity, (n - 1) / 3.0), init="pca",
                    random_state=params.seed, method="barnes_hut" if params.dims < 4 else "exact")
        coords[:] = tsne.fit_transform(reduced)
    else:
        raise ProjectionRefused(f"unknown method {params.method!r}; one of {', '.join(proj.METHODS)}")
    timings["fit"] = time.perf_counter() - t
    log(f"fitted {params.method} {params.dims}D on {len(rows):,} of {n:,} images in {timings['fit']:.1f} s")

    t = time.perf_counter()
    search_index = getattr(reducer, "_knn_search_index", None)
    if search_index is not None:  # the k-NN search graph that transform (and pickling the model) needs: built once
        search_index.prepare()
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    if params.method == "umap":
        rest = np.setdiff1d(np.arange(n), rows)
        for s in _batches(len(rest), params.batch, progress, "transform"):
            part = rest[s:s + params.batch]
            coords[part] = reducer.transform(reduced[part])
    timings["transform"] = time.perf_counter() - t

    t = time.perf_counter()
    k = max(1, min(params.clusters, len(rows) // 5))
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=params.seed).fit(reduced[rows])
    clusters = kmeans.predict(reduced).astype(np.int32)
    timings["cluster"] = time.perf_counter() - t
    model = {"features": features, "params": asdict(params), "pca": pca, "reducer": reducer, "kmeans": kmeans}
    return Fitted(coords, clusters, reduced, model, len(rows), timings)


def transform_arrays(model: dict[str, Any], x: Any, *, batch: int = 20_000, progress: bool = False
                     ) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.float32]]:
    """Place new rows on a fitted map (PCA, reducer, k-means): coordinates, clusters, reduced features."""
    p = model["params"]
    reduced = _reduce(model["pca"], x, model["features"], batch)
    if p["method"] == "pca":
        coords = reduced[:, :p["dims"]].copy()
    elif model["reducer"] is not None:
        coords = np.empty((len(x), p["dims"]), np.float32)
        for s in _batches(len(x), batch, progress, "transform"):
            coords[s:s + batch] = model["reducer"].transform(reduced[s:s + batch])
    else:
        raise ProjectionRefused(f"{p['method']} has no transform")
    return coords, model["kmeans"].predict(reduced).astype(np.int32), reduced


# --- the job over a lake ----------------------------------------------------------------------------------------------


def _open(lake_root: Path) -> tuple[Any, Any]:
    from imgrec.index import IndexSet
    from imgrec.lake import Lake, LakeError

    lake = Lake(lake_root)
    if not lake.exists:
        raise LakeError(f"no lake at {lake.root}; run: imgrec ingest FOLDER --lake {lake.root}")
    return lake, IndexSet.open(lake)


def _matrix(idx: Any, features: str) -> Any:
    if features not in proj.FEATURES:
        raise ProjectionRefused(f"unknown features {features!r}; one of {', '.join(proj.FEATURES)}")
    return idx.embeddings if features == "embedding" else idx.color


def cluster_summaries(lake: Any, ids: NDArray[np.int64], clusters: NDArray[np.int32], reduced: NDArray[np.float32],
                      centres: NDArray[np.floating], reps: int = 6) -> list[dict[str, Any]]:
    """Per cluster: size, a short label (its most frequent predicted labels), its top folders and the images
    closest to its centre."""
    import pyarrow as pa

    members = pa.table({"image_id": pa.array(ids, pa.int64()), "cluster": pa.array(clusters, pa.int32())})
    conn = lake.connect()
    try:
        conn.con.register("members", members)
        labels = conn.sql("SELECT m.cluster, l.label, count(*) AS n FROM members m JOIN labels l USING (image_id) "
                          "WHERE l.label IS NOT NULL GROUP BY ALL ORDER BY m.cluster, n DESC, l.label")
        folders = conn.sql("SELECT m.cluster, split_part(i.relpath, '/', 1) AS top, count(*) AS n FROM members m "
                           "JOIN images i USING (image_id) GROUP BY ALL ORDER BY m.cluster, n DESC, top")
    finally:
        conn.close()
    out = []
    for c in range(len(centres)):
        mask = clusters == c
        size = int(mask.sum())
        if not size:
            continue
        rows = np.flatnonzero(mask)
        d = ((reduced[rows] - centres[c]) ** 2).sum(1)
        top = [(lab, n) for cl, lab, n in labels if cl == c][:3]
        fold = [(f, n) for cl, f, n in folders if cl == c][:3]
        out.append({
            "cluster": c, "size": size,
            "label": " / ".join(lab for lab, _ in top[:2]) or f"cluster {c}",
            "labels": [{"label": lab, "share": round(n / size, 3)} for lab, n in top],
            "folders": [{"folder": f, "share": round(n / size, 3)} for f, n in fold],
            "representatives": [int(i) for i in ids[rows[np.argsort(d, kind="stable")[:reps]]]],
        })
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("umap-learn", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def project(lake_root: str | Path, features: str = "embedding", params: Params | None = None, *,
            refit: bool = False, progress: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Make or update one map of the lake's current index; returns the map's description (also stored)."""
    from imgrec.lake import now

    params = params or Params()
    log = log or (lambda s: None)
    t_all = time.perf_counter()
    lake, idx = _open(Path(lake_root))
    key = proj.map_key(features, params.method, params.dims)
    x = _matrix(idx, features)
    ids = np.asarray(idx.ids, dtype=np.int64)
    if idx.snapshot != lake.snapshot():
        log(f"note: the search index covers snapshot {idx.snapshot}, the lake is at {lake.snapshot()}; "
            "mapping the indexed snapshot (run `imgrec index` to catch up)")
    old_meta = proj.read_meta(lake.root).get(key)
    mpath = proj.model_path(lake.root, key)
    reuse = (not refit and old_meta is not None and proj.fetch(lake.root, mpath) and params.method != "tsne"
             and old_meta.get("params", {}).get("fit") == params.fit_params()
             and (features != "embedding" or old_meta.get("space") == idx.meta.get("space")))  # new space: refit
    timings: dict[str, float] = {}
    added = removed = 0
    if reuse:
        maps = proj.read_maps(lake.root)
        assert maps is not None
        old = maps.coords(key)
        keep = np.isin(old["image_id"], ids)
        new_ids = np.setdiff1d(ids, old["image_id"])
        added, removed = len(new_ids), int((~keep).sum())
        if not added and not removed:
            log(f"{key}: up to date ({len(ids):,} images, snapshot {idx.snapshot})")
            return {**old_meta, "status": "up to date"}
        t = time.perf_counter()
        model = proj.read_model(mpath)
        timings["load_model"] = time.perf_counter() - t
        t = time.perf_counter()
        new_coords, new_clusters, _ = transform_arrays(model, x[idx.rows(new_ids)] if added else x[:0],
                                                       batch=params.batch, progress=progress)
        timings["transform"] = time.perf_counter() - t
        old_xyz = np.stack([old["x"], old["y"], old["z"]], 1)[keep, :params.dims]
        all_ids = np.concatenate([old["image_id"][keep], new_ids])
        order = np.argsort(all_ids, kind="stable")
        ids = all_ids[order]
        coords = np.concatenate([old_xyz, new_coords])[order]
        clusters = np.concatenate([old["cluster"][keep], new_clusters])[order]
        t = time.perf_counter()
        reduced = _reduce(model["pca"], x, features, params.batch)[idx.rows(ids)]
        timings["pca"] = time.perf_counter() - t
        fitted_on, fitted_at = old_meta["fitted_on"], old_meta["fitted_snapshot"]
        log(f"{key}: placed {added:,} new images with the fitted model, dropped {removed:,} removed ones")
    else:
        fit = fit_arrays(x, features, params, progress=progress, log=log)
        model, coords, clusters, reduced = fit.model, fit.coords, fit.clusters, fit.reduced
        timings.update(fit.timings)
        fitted_on, fitted_at = fit.fitted_on, idx.snapshot
    t = time.perf_counter()
    summaries = cluster_summaries(lake, ids, clusters, reduced, model["kmeans"].cluster_centers_)
    timings["cluster"] = timings.get("cluster", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    meta = {
        "key": key, "features": features, "method": params.method, "dims": params.dims,
        "space": idx.meta.get("space"),
        "params": {"fit": params.fit_params(), "batch": params.batch}, "count": int(len(ids)),
        "snapshot": idx.snapshot, "fitted_on": int(fitted_on), "fitted_snapshot": int(fitted_at),
        "added": added, "removed": removed, "refitted": not reuse, "clusters": summaries,
        "versions": _versions(), "created_at": now().isoformat(timespec="seconds"),
    }
    if not reuse:
        if model["reducer"] is not None or params.method == "pca":
            proj.write_model(mpath, model)
            proj.publish(lake.root, mpath)
        else:
            mpath.unlink(missing_ok=True)  # t-SNE: nothing to transform with
    rows = proj.map_rows(features, params.method, params.dims, ids, coords, clusters)
    timings["write"] = time.perf_counter() - t  # the model and the rows; the table's own write is logged below
    timings["total"] = time.perf_counter() - t_all
    meta["timings"] = {k: round(v, 3) for k, v in timings.items()}
    t = time.perf_counter()
    proj.replace_map(lake.root, key, rows, meta)
    log(f"{key}: table written in {time.perf_counter() - t:.1f} s")
    log(f"{key}: {len(ids):,} images, {len(summaries)} clusters; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in meta["timings"].items()))
    return {**meta, "status": "updated" if reuse else "fitted"}


# --- evaluation on labelled sets ----------------------------------------------------------------------------------


def labelled_sets(lake: Any) -> list[dict[str, Any]]:
    """Labelled sets of the lake: a ``labels.csv`` (columns ``path``, ``class_id``; paths relative to its folder)
    at a collection's root or one folder below; returns name, image ids and classes of the images found."""
    import csv

    conn = lake.connect()
    try:
        roots = conn.sql("SELECT collection, root FROM collections")
        images = conn.sql("SELECT collection, relpath, image_id FROM images")
    finally:
        conn.close()
    by_path = {(c, r): int(i) for c, r, i in images}
    out = []
    for collection, root in roots:
        for csv_path in sorted([*Path(root).glob("labels.csv"), *Path(root).glob("*/labels.csv")]):
            prefix = csv_path.parent.relative_to(root).as_posix()
            ids, classes = [], []
            with open(csv_path, newline="") as fh:
                for row in csv.DictReader(fh):
                    if "path" not in row or "class_id" not in row:
                        break
                    rel = row["path"] if prefix == "." else f"{prefix}/{row['path']}"
                    if (collection, rel) in by_path:
                        ids.append(by_path[(collection, rel)])
                        classes.append(row["class_id"])
            if len(ids) >= 20 and len(set(classes)) >= 2:
                name = collection if prefix == "." else prefix
                out.append({"name": name, "ids": np.asarray(ids, np.int64), "classes": np.asarray(classes)})
    return out


def _purity(clusters: NDArray[np.integer], classes: NDArray[Any]) -> float:
    """Share of images whose cluster's most common class is their own class."""
    hit = 0
    for c in np.unique(clusters):
        _, counts = np.unique(classes[clusters == c], return_counts=True)
        hit += int(counts.max())
    return hit / len(classes)


def evaluate(lake_root: str | Path, k: int = 10, global_queries: int = 1000, seed: int = 0,
             log: Log | None = None) -> dict[str, Any]:
    """Neighbour preservation @k and class silhouette of every stored map on the lake's labelled sets (and
    neighbour preservation over the whole lake from a sample of queries); written to ``evaluation.json``."""
    from imgrec.lake import now

    log = log or (lambda s: None)
    lake, idx = _open(Path(lake_root))
    maps = proj.read_maps(lake.root)
    if maps is None:
        raise ProjectionRefused(f"no map yet; run: imgrec project --lake {lake.root}")
    sets = labelled_sets(lake)
    all_ids = np.asarray(idx.ids, np.int64)
    result: dict[str, Any] = {"k": k, "created_at": now().isoformat(timespec="seconds"), "lake": str(lake.root),
                              "snapshot": idx.snapshot, "images": int(len(all_ids)), "sets": [], "global": []}
    full = {f: prepare(_matrix(idx, f), f) for f in proj.FEATURES}
    for s in sets:
        rows = idx.rows(s["ids"])
        entry: dict[str, Any] = {"name": s["name"], "images": int(len(rows)), "classes": int(len(set(s["classes"]))),
                                 "full_silhouette": {}, "maps": []}
        for f in proj.FEATURES:
            entry["full_silhouette"][f] = round(proj.silhouette(full[f][rows], s["classes"]), 4)
        for key in maps.keys:
            m = maps.meta[key]
            c = maps.coords(key)
            pos = np.searchsorted(c["image_id"], s["ids"])
            pos = np.clip(pos, 0, len(c["image_id"]) - 1)
            if not np.all(c["image_id"][pos] == s["ids"]):
                continue
            low = np.stack([c["x"], c["y"], c["z"]], 1)[pos, :m["dims"]]
            entry["maps"].append({
                "key": key, "features": m["features"], "method": m["method"], "dims": m["dims"],
                "np_at_k": round(proj.neighbour_preservation(full[m["features"]][rows], low, k), 4),
                "silhouette": round(proj.silhouette(low, s["classes"]), 4),
                "cluster_purity": round(_purity(c["cluster"][pos], s["classes"]), 4),
            })
        log(f"evaluated {s['name']}: {len(rows)} images, {entry['classes']} classes")
        result["sets"].append(entry)
    queries = sample_rows(len(all_ids), global_queries, seed)
    for key in maps.keys:
        m = maps.meta[key]
        c = maps.coords(key)
        if len(c["image_id"]) != len(all_ids) or not np.array_equal(c["image_id"], all_ids):
            continue
        low = np.stack([c["x"], c["y"], c["z"]], 1)[:, :m["dims"]]
        result["global"].append({"key": key, "features": m["features"], "method": m["method"], "dims": m["dims"],
                                 "np_at_k": round(proj.neighbour_preservation(full[m["features"]], low, k, queries), 4),
                                 "queries": int(len(queries)), "timings": m.get("timings", {})})
    proj.write_json(proj.evaluation_path(lake.root), result)
    proj.publish(lake.root, proj.evaluation_path(lake.root))
    return result


# --- the command line -------------------------------------------------------------------------------------------------


def run_cli(args: Any) -> int:
    """``imgrec project``: every asked map (features x method x dims), then ``--evaluate``."""
    import json
    from dataclasses import replace

    from imgrec.config import resolve_lake
    from imgrec.index import StaleIndex

    quiet = args.json
    log: Log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    lake = resolve_lake(args.lake)
    base = Params()
    base = replace(base, **{k: v for k, v in {"sample": args.sample, "clusters": args.clusters, "seed": args.seed,
                                              "tsne_max": args.tsne_max}.items() if v is not None})
    progress = not args.quiet and not args.json and sys.stderr.isatty()
    out: list[dict[str, Any]] = []
    refused = 0
    try:
        for features in dict.fromkeys(args.features):
            for method in dict.fromkeys(args.method):
                for dims in dict.fromkeys(args.dims):
                    params = replace(base, method=method, dims=dims)
                    try:
                        meta = project(lake, features, params, refit=args.refit, progress=progress, log=log)
                    except ProjectionRefused as exc:
                        refused += 1
                        log(f"{proj.map_key(features, method, dims)}: refused: {exc}")
                        out.append({"key": proj.map_key(features, method, dims), "status": "refused",
                                    "reason": str(exc)})
                        continue
                    out.append({k: meta[k] for k in ("key", "status", "count", "fitted_on", "added", "removed",
                                                     "timings") if k in meta})
                    if not quiet:
                        print(f"{meta['key']}: {meta['status']}, {meta['count']:,} images "
                              f"(fitted on {meta['fitted_on']:,}), {len(meta['clusters'])} clusters, "
                              f"total {meta.get('timings', {}).get('total', 0.0):.1f} s")
        report: dict[str, Any] = {"lake": str(lake), "maps": out, "table": str(proj.table_path(lake))}
        if args.evaluate:
            report["evaluation"] = evaluate(lake, log=log)
            if not quiet:
                print(format_evaluation(report["evaluation"]))
    except StaleIndex as exc:
        print(f"imgrec: error: {exc}", file=sys.stderr)
        return 2
    if quiet:
        print(json.dumps(report, indent=1))
    return 2 if refused and refused == len(out) else 0


def format_evaluation(ev: dict[str, Any]) -> str:
    """The evaluation as a plain-text table."""
    lines = [f"neighbours kept @{ev['k']} (np), class silhouette in the map (sil) and in the full space, "
             "cluster purity"]
    for s in ev["sets"]:
        full = ", ".join(f"{f} {v:.3f}" for f, v in s["full_silhouette"].items())
        lines.append(f"{s['name']}: {s['images']} images, {s['classes']} classes; full-space silhouette: {full}")
        for m in s["maps"]:
            lines.append(f"  {m['key']:<22} np {m['np_at_k']:.3f}  sil {m['silhouette']:+.3f}  "
                         f"purity {m['cluster_purity']:.3f}")
    for g in ev["global"]:
        lines.append(f"whole lake {g['key']:<22} np {g['np_at_k']:.3f} ({g['queries']} queries)")
    return "\n".join(lines)
