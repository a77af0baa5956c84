"""The `imgrec` command line: ingest, index, search, stats. Heavy modules are imported only by the command that
needs them, so `imgrec --help` and `imgrec stats` start fast."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from imgrec.config import Config
from imgrec.measures import DISTANCES, MEASURES


def _config(args: argparse.Namespace, **extra: Any) -> Config:
    overrides = {k: v for k, v in {"backend": getattr(args, "backend", None), **extra}.items() if v is not None}
    return Config.load(args.lake, **overrides)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import ingest

    cfg = _config(args, model=args.model, workers=args.workers, batch_size=args.batch_size, device=args.device,
                  commit_every=args.commit_every, embed_threads=args.embed_threads,
                  engine=args.engine or ("ray" if args.address else None),
                  ray_address=args.address, embed_actors=args.embed_actors, ray_stages=args.ray_stages)
    if args.progress_json:  # machine-readable progress on stdout (the app's background ingestion reads it)
        on_progress, log, phase = _json_progress()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON lines' alone (Ray prints its own there)
            report = ingest(args.roots, cfg, progress=False, on_progress=on_progress, log=log,
                            build_index=not args.no_index, searchable_early=args.searchable_early)
            if args.map and not report.interrupted and not args.no_index:
                _map_after_ingest(cfg, args.map_max, log, progress=False, phase=phase)
        _emit({"event": "report", **report.to_json()})
        return 130 if report.interrupted else 0
    progress = not args.quiet and sys.stderr.isatty() or args.progress
    report = ingest(args.roots, cfg, progress=progress, build_index=not args.no_index,
                    searchable_early=args.searchable_early)
    if args.map and not report.interrupted and not args.no_index:
        _map_after_ingest(cfg, args.map_max, lambda s: print(s, file=sys.stderr, flush=True), progress=progress)
    if args.json:  # flushed now: a Ray driver's exit has been seen to drop what stdout still buffered
        print(json.dumps(report.to_json(), indent=1), flush=True)
    else:
        print(report.summary(), flush=True)
    return 130 if report.interrupted else 0


def _map_after_ingest(cfg: Any, map_max: int, log: Any, progress: bool, phase: Any = None) -> None:
    """``imgrec ingest --map``: the Explorer's default map (UMAP 2D of the embeddings), made or brought up to date."""
    from imgrec.index import IndexSet
    from imgrec.lake import Lake
    from pipelines.project import Params, ProjectionRefused, project

    size = IndexSet.open(Lake(cfg.lake)).size
    if map_max and size > map_max:
        log(f"imgrec: {size:,} images: make the map with `imgrec project --lake {cfg.lake}` (a few minutes, with "
            "its progress bar)")
        return
    if phase is not None:
        phase("map", images=size)
    log(f"imgrec: making the map of {size:,} images (UMAP 2D of the embeddings)")
    try:
        meta = project(cfg.lake, "embedding", Params(), progress=progress, log=log)
    except ProjectionRefused as exc:
        log(f"imgrec: no map: {exc}")
        return
    log(f"imgrec: map {meta['key']}: {meta['status']}, {meta['count']:,} images, "
        f"{meta.get('timings', {}).get('total', 0.0):.1f} s")


def _printable(text: str) -> str:
    """A path on one line: newlines, tabs and other control characters in file names shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _emit(event: dict[str, Any], out: Any = None) -> None:
    print(json.dumps(event), file=out or sys.stdout, flush=True)


def _json_progress(every_s: float = 0.25) -> tuple[Any, Any, Any]:
    """ingest() callbacks printing one JSON line per progress update (at most one per ``every_s``, and the last one):
    ``{"event": "progress", "done", "total", "images_per_s", "elapsed_s"}``; log lines also as ``{"event": "log"}``;
    and ``phase(name, **details)``: ``{"event": "phase", "phase": name, ...}`` (the map after an ingestion)."""
    import time

    t_start, out = time.perf_counter(), sys.stdout  # stdout as it is now (the run may redirect it meanwhile)
    first: list[float] = []  # time and count at the first image: the rate leaves out the scan and the model load
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if not first:
            first.extend((now, float(done)))
        if done < total and now - last[0] < every_s and done > 1:
            return
        last[0] = now
        rate = (done - first[1]) / (now - first[0]) if now > first[0] and done > first[1] else 0.0
        _emit({"event": "progress", "done": done, "total": total, "images_per_s": round(rate, 2),
               "elapsed_s": round(now - t_start, 2)}, out)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        _emit({"event": "log", "message": message, "elapsed_s": round(time.perf_counter() - t_start, 2)}, out)

    def phase(name: str, **details: Any) -> None:
        _emit({"event": "phase", "phase": name, **details, "elapsed_s": round(time.perf_counter() - t_start, 2)}, out)

    return on_progress, log, phase


def cmd_index(args: argparse.Namespace) -> int:
    from pipelines.index import build_indexes

    if args.shards is not None and args.shards < 1:
        print("imgrec: --shards must be at least 1", file=sys.stderr)
        return 2
    cfg = _config(args, **({"index_shards": args.shards} if args.shards else {}),
                  engine=args.engine or ("ray" if args.address else None), ray_address=args.address)
    meta = build_indexes(cfg, force=args.force, log=lambda s: print(s, file=sys.stderr))
    out = {k: meta[k] for k in ("snapshot", "count", "build_seconds")}
    if meta.get("shards"):
        out["shards"] = {k: meta["shards"][k] for k in ("count", "images", "rebuilt", "unchanged", "engine", "nodes")
                         if k in meta["shards"]}
    print(json.dumps(out))
    return 0


def cmd_serve_shards(args: argparse.Namespace) -> int:
    from imgrec import shard_actors
    from imgrec.lake import Lake

    lake = Lake(_config(args).lake)
    if args.stop:
        shard_actors.connect(args.address)
        print(json.dumps({"stopped": shard_actors.stop(lake)}))
        return 0
    out = shard_actors.serve(lake, args.address)
    print(json.dumps(out, indent=1))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from imgrec.search import Engine

    cfg = _config(args, device=args.device, shard_address=args.shard_address)
    engine = Engine(cfg)
    resp = engine.search(
        args.images, measure=args.measure, k=args.k, distance=args.distance, threshold=args.threshold,
        collections=args.collection, folders=args.folder, exclude_query=args.exclude_query,
    )
    if args.json:
        out = resp.to_json()
        out["results"] = [{k: r[k] for k in ("image_id", "path", "score", "scores", "rank", "label")}
                          for r in out["results"]]
        print(json.dumps(out, indent=1))
        return 0
    for part in resp.missing:
        print(f"imgrec: warning: not searched: {part}", file=sys.stderr)
    print(f"{resp.measure} ({resp.distance}), {len(resp.results)} results from {resp.candidates} candidates, "
          f"{resp.timings_ms['total']:.1f} ms")
    for r in resp.results:
        per = " ".join(f"{m}={v:.3f}" for m, v in r.scores.items())
        print(f"{r.rank:>3}  {r.score:.4f}  [{per}]  {_printable(r.path)}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in resp.timings_ms.items() if k != "total")
    print(f"stages (ms): {stages}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from imgrec.evaluate import EvalError, evaluate, format_table

    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    if args.protocol == "lodo":
        from imgrec.lodo import format_lodo, run

        report = run([(d, args.label_by) for d in args.dataset], limit=args.limit or 1000, seed=args.seed, log=log,
                     progress=not args.json and sys.stderr.isatty())
        print(json.dumps(report, indent=1) if args.json else format_lodo(report))
        if not args.json:
            print(f"({report['seconds']} s)")
        return 0
    if len(args.dataset) != 1:
        raise EvalError("give one labelled set (several: --protocol lodo)")
    args.dataset = args.dataset[0]
    report = evaluate(args.dataset, args.measure or MEASURES, label_by=args.label_by, lake=args.lake, multi=not args.no_multi,
                      near=not args.no_near, limit=args.limit, near_sample=args.near_sample, seed=args.seed,
                      log=log, progress=not args.json and sys.stderr.isatty())
    if args.json:
        out = {**report, "measures": {m: {k: v for k, v in r.items() if k != "pr_curve"}
                                      for m, r in report["measures"].items()}}
        print(json.dumps(out, indent=1))
    else:
        print(format_table(report))
        print(f"({report['seconds']} s; report saved in {report['lake']}/reports/eval-{report['name']}.json)")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from pipelines.project import run_cli

    return run_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from imgrec.bench.runner import cli

    return cli(args)


def cmd_join(args: argparse.Namespace) -> int:
    """A similarity join of two sides of the lake: Parquet / CSV, or JSON on stdout, with a progress bar."""
    import time

    from imgrec.join import COLUMNS, join_pairs, schema
    from imgrec.search import Engine, one_blas_thread

    t0 = time.perf_counter()
    engine = Engine(_config(args))
    t_open = time.perf_counter()
    bar, on_progress = None, None
    if args.progress_json:
        on_progress, _, _ = _json_progress()
    elif not args.quiet and sys.stderr.isatty() or args.progress:
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="join", dynamic_ncols=True)

        def on_progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

    out = args.out
    writer: Any = None
    pairs: list[dict[str, Any]] = []
    n = 0
    try:
        with one_blas_thread():
            for batch in join_pairs(engine, args.left, args.right, args.measure, k=args.k, threshold=args.threshold,
                                    max_pairs=args.max_pairs, on_progress=on_progress):
                n += batch.num_rows
                if out and out.endswith(".csv"):
                    import pyarrow.csv as pacsv

                    writer = writer or pacsv.CSVWriter(out, schema())
                    writer.write_batch(batch)
                elif out:
                    import pyarrow.parquet as pq

                    writer = writer or pq.ParquetWriter(out, schema(), compression="zstd")
                    writer.write_batch(batch)
                if args.json or not out:
                    pairs += batch.to_pylist()
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    if out and writer is None:  # no pair at all: still a file, with its columns
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        (pacsv.write_csv if out.endswith(".csv") else pq.write_table)(schema().empty_table(), out)
    timings = {"open": round((t_open - t0) * 1000, 1), "join": round((time.perf_counter() - t_open) * 1000, 1),
               "total": round((time.perf_counter() - t0) * 1000, 1)}
    if args.progress_json:
        _emit({"event": "report", "pairs": n, "out": out, "timings_ms": timings})
    elif args.json:
        print(json.dumps({"pairs": [{**{c: p[c] for c in ("left_id", "left_path", "right_id", "right_path", "score",
                                                           "rank")},
                                     "scores": {m: p[f"score_{m}"] for m in ("embedding", "color", "hash")}}
                                    for p in pairs], "timings_ms": timings}, indent=1))
    else:
        if not out:
            for p in pairs:
                print(f"{p['rank']:>3}  {p['score']:.4f}  {_printable(p['left_path'])}  ~  {_printable(p['right_path'])}")
        print(f"{n:,} pairs{f' written to {out}' if out else ''} in {timings['total'] / 1000:.1f} s "
              f"({', '.join(COLUMNS)})", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The HTTP API (``--api``), or the Streamlit app, on loopback unless told otherwise."""
    from imgrec import access

    if not args.api:
        import subprocess
        from pathlib import Path

        app = Path(__file__).resolve().parents[1] / "app.py"
        if not app.is_file():
            raise FileNotFoundError(f"the app ({app}) is not here: run `streamlit run app.py` from the project")
        env = {**os.environ, **({"IMGREC_LAKE": args.lake} if args.lake else {})}
        cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
               "--server.port", str(args.port or 8501)]
        return subprocess.call(cmd, cwd=app.parent, env=env)
    from imgrec.api import serve
    from imgrec.search import Engine

    key = args.api_key or os.environ.get(access.API_KEY_ENV) or None
    engine = Engine(_config(args))
    where = f"http://{args.host}:{args.port or 8000}"
    print(f"imgrec: API on {where} (reference: {where}/docs){' with an API key' if key else ''}; Ctrl-C stops it",
          file=sys.stderr)
    serve(engine, args.host, args.port or 8000, key, max_request_bytes=int(args.max_request_mb * 1024 * 1024))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The embedding models imgrec offers, whether each is usable here, and what the lake's embeddings were made with."""
    from imgrec.features.runtime import models_here
    from imgrec.lake import Lake

    rows = models_here()
    lake = Lake(_config(args).lake)
    manifest = lake.manifest() if lake.exists else None
    used = dict(manifest.model) if manifest is not None else None
    if args.json:
        print(json.dumps({"models": rows, "lake": str(lake.root), "lake_model": used}, indent=1))
        return 0
    for r in rows:
        state = f"available ({r['weights']})" if r["available"] else f"not here: {r['missing']}"
        print(f"{r['name']:20s} {r['dim']:5d}-d  {state}")
    if used is not None:
        print(f"\nthe lake {lake.root} is embedded with {used.get('name')} (weights checksum {used.get('checksum')})")
    else:
        print(f"\nno lake at {lake.root} yet: imgrec ingest FOLDER --model NAME makes one")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from imgrec.lake import Lake

    lake = Lake(_config(args).lake)
    conn = lake.connect()
    try:
        per = conn.sql(
            "SELECT collection, any_value(root), count(*) AS n, sum(size_bytes) FROM images "
            "JOIN collections USING (collection) GROUP BY collection ORDER BY collection")
        skipped = [{"path": p, "reason": r} for p, r in conn.sql(
            "SELECT path, reason FROM skipped ORDER BY path")]
        n = conn.count()
    finally:
        conn.close()
    if args.json:
        print(json.dumps({
            "lake": str(lake.root), "snapshot": lake.snapshot(), "images": n,
            "collections": [{"collection": c, "root": root, "images": k, "bytes": int(b or 0)}
                            for c, root, k, b in per],
            "skipped": skipped,
        }, indent=1))
        return 0
    if not lake.exists:
        print(f"{lake.root}: no lake yet; run: imgrec ingest FOLDER --lake {lake.root}")
        return 0
    print(f"lake {lake.root}, snapshot {lake.snapshot()}: {n} searchable images")
    for c, root, k, b in per:
        print(f"  {c}: {k} images, {int(b or 0) / 1e6:.1f} MB  ({root})")
    print(f"skipped files: {len(skipped)}")
    for s in skipped[:50]:
        print(f"  {_printable(s['path'])}: {s['reason']}")
    if len(skipped) > 50:
        print(f"  ... and {len(skipped) - 50} more (--json lists all)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgrec", description="Content-based image search over a Parquet lake.")
    sub = p.add_subparsers(dest="command", required=True)

    def lake_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--lake", help="lake folder (default: $IMGREC_LAKE, else data/lake)")
        sp.add_argument("--backend", choices=("auto", "onnx", "torch"),
                        help="what runs the embedding model: onnx (ONNX Runtime on the CPU), torch, or auto (the "
                             "default: torch on a GPU, else ONNX Runtime where installed; the same vectors)")

    sp = sub.add_parser("ingest", help="add or update folders of images in the lake (incremental, resumable)")
    sp.add_argument("roots", nargs="+", metavar="ROOT", help="folder(s) of images, walked recursively")
    lake_arg(sp)
    sp.add_argument("--model", help="embedding model for a new lake (default efficientnet-lite0)")
    sp.add_argument("--workers", type=int, help="decoding processes (default: number of cores, at most 4)")
    sp.add_argument("--batch-size", type=int, help="embedding batch size (default 32)")
    sp.add_argument("--device", help="auto, cpu or cuda")
    sp.add_argument("--embed-threads", type=int,
                    help="torch threads for the CPU embedding (default 0: chosen from what the workers leave)")
    sp.add_argument("--commit-every", type=int, help="images per atomic commit (default 512)")
    sp.add_argument("--engine", choices=("local", "ray"),
                    help="local (default): worker processes on this machine; ray: a Ray Data job on a cluster")
    sp.add_argument("--address", help="--engine ray: the cluster (auto, or HOST:PORT of its head; default: a local "
                                      "Ray instance on 127.0.0.1, started and stopped by this command)")
    sp.add_argument("--ray-stages", choices=("auto", "fused", "split"),
                    help="--engine ray: fused (each task decodes and embeds), split (CPU tasks decode, actors embed), "
                         "or auto (the default: split where the cluster has GPUs)")
    sp.add_argument("--embed-actors", type=int,
                    help="--engine ray: embedding actors (default: one per GPU; fused: tasks at a time, one per CPU)")
    sp.add_argument("--no-index", action="store_true", help="do not rebuild the search index at the end")
    sp.add_argument("--searchable-early", action="store_true",
                    help="a lake without an index: index the first images at once, then again as the lake doubles, "
                         "so that searches (the app) find images while the run goes on")
    sp.add_argument("--map", action="store_true",
                    help="then make the map the Explorer shows (UMAP 2D of the embeddings; imgrec project)")
    sp.add_argument("--map-max", type=int, default=0,
                    help="with --map: only for a lake of at most this many images (0: any size); larger lakes: "
                         "imgrec project, with its progress bar")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("--progress-json", action="store_true",
                    help="print one JSON line per progress update (done, total, images_per_s, elapsed_s), at most "
                         "4 a second, then the report as a JSON line (for programs such as the app)")
    sp.set_defaults(func=cmd_ingest)

    sp = sub.add_parser("index", help="build the search index of the lake's current snapshot")
    lake_arg(sp)
    sp.add_argument("--force", action="store_true", help="rebuild from scratch even if the index is current")
    sp.add_argument("--shards", type=int, help="deal the images to N shards, each its own graphs, built in parallel "
                                               "and searched side by side (default: as the current index; 1: one)")
    sp.add_argument("--engine", choices=("local", "ray"), help="where the shards are built: processes here "
                    "(default), or Ray tasks on the cluster at --address")
    sp.add_argument("--address", help="the Ray cluster for --engine ray (HOST:PORT, or auto)")
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("search", help="the most similar images to 1 to 5 query images")
    sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or id:N for an image of the lake")
    lake_arg(sp)
    sp.add_argument("--measure", choices=MEASURES, default="mix")
    sp.add_argument("--distance", help="; ".join(f"{m}: {', '.join(d)}" for m, d in DISTANCES.items()))
    sp.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    sp.add_argument("--threshold", type=float, help="range query: every image scoring at least this (0..1)")
    sp.add_argument("--collection", action="append", help="only this collection (repeatable)")
    sp.add_argument("--folder", action="append", help="only this folder and its sub-folders (repeatable)")
    sp.add_argument("--exclude-query", action="store_true", help="leave the query images out of the results")
    sp.add_argument("--device", help="auto, cpu or cuda")
    sp.add_argument("--shard-address", help="search the index's shards through the Ray cluster at this address "
                                            "(imgrec serve-shards; default: $IMGREC_SHARD_ADDRESS, else here)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("serve-shards", help="keep the index's shards resident in Ray actors on a cluster's nodes "
                                             "(searched by engines with --shard-address / $IMGREC_SHARD_ADDRESS)")
    lake_arg(sp)
    sp.add_argument("--address", required=True, help="the Ray cluster (HOST:PORT, or auto)")
    sp.add_argument("--stop", action="store_true", help="stop the lake's shard servers instead")
    sp.set_defaults(func=cmd_serve_shards)

    sp = sub.add_parser("eval", help="retrieval quality on a labelled set (labels.csv: path, class_id)")
    sp.add_argument("dataset", metavar="DATASET_DIR", nargs="+",
                    help="folder with labels.csv and the images (--protocol lodo: two or more)")
    sp.add_argument("--protocol", choices=("single", "lodo"), default="single",
                    help="lodo: leave-one-dataset-out over the sets: the mix's fusion chosen on the others, "
                         "reported on each held-out set (docs/relevance.md)")
    sp.add_argument("--label-by", choices=("csv", "prefix", "auto"), default="auto",
                    help="labels.csv, or the file name before its first dot (cat.1.jpg: cat); auto: labels.csv "
                         "where there is one (default)")
    sp.add_argument("--lake", help="a lake that holds the set (default: a cache lake per set, ingested on first use)")
    sp.add_argument("--measure", action="append", choices=MEASURES, help="only this measure (repeatable)")
    sp.add_argument("--limit", type=int, help="only the first N images as single-image queries (lodo: a random "
                    "sample of N per set, default 1000)")
    sp.add_argument("--near-sample", type=int, default=50, help="images with transformed copies (default 50)")
    sp.add_argument("--no-multi", action="store_true", help="skip the multi-image queries")
    sp.add_argument("--no-near", action="store_true", help="skip the near-duplicate retrieval")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", action="store_true", help='print {"measures": {"color": {"map": ...}, ...}, ...}')
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("project", help="map every image in 2D / 3D (PCA, UMAP, t-SNE) with clusters")
    lake_arg(sp)
    sp.add_argument("--method", nargs="+", choices=("umap", "tsne", "pca"), default=["umap"])
    sp.add_argument("--dims", nargs="+", type=int, choices=(2, 3), default=[2])
    sp.add_argument("--features", nargs="+", choices=("embedding", "color"), default=["embedding"])
    sp.add_argument("--refit", action="store_true", help="fit again instead of placing only the new images")
    sp.add_argument("--sample", type=int, help="images the model is fitted on (default 30000; the rest transformed)")
    sp.add_argument("--clusters", type=int, help="k-means clusters (default 20)")
    sp.add_argument("--seed", type=int, help="random seed (default 0)")
    sp.add_argument("--tsne-max", type=int, help="t-SNE only up to this many images (default 20000)")
    sp.add_argument("--evaluate", action="store_true",
                    help="then measure the maps on the labelled sets (neighbours kept, silhouette)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_project)

    sp = sub.add_parser("bench", help="performance benchmark: search stage vs exact search, end to end, cold "
                                      "start, ingestion; a JSON report and a Markdown table against the targets")
    sp.add_argument("--quick", action="store_true", help="N = 10k only, few queries (under 3 minutes); default: full")
    sp.add_argument("--sizes", help="collection sizes, e.g. 10000,100k,400k,1M (default: 10k; full: 10k,100k,400k,1M)")
    sp.add_argument("--out", help="folder of the report files bench-<quick|full>.json and .md (default docs/bench; "
                                  "other --sizes than the mode's add them to the name: bench-full-100k.md)")
    sp.add_argument("--source-lake", help="a lake of real photos whose features seed the synthetic collections "
                                          "(default: ../shared/data's corel1k + flowers17, ingested once and cached)")
    sp.add_argument("--work", help="cache of synthetic lakes (default: $IMGREC_BENCH_CACHE, else "
                                   "~/.cache/imgrec/bench)")
    sp.add_argument("--skip", action="append", choices=("search", "e2e", "cold", "ingest"),
                    help="leave out a part (repeatable)")
    sp.add_argument("--queries", type=int, help="single-image searches per measure (5-image ones: a third)")
    sp.add_argument("--ingest-limit", type=int, help="images per ingested set (0: all; quick 400, full 2000)")
    sp.add_argument("--json", action="store_true", help="print the whole report as JSON")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("join", help="similarity join: for every image of LEFT its k best in RIGHT, or every pair "
                                     "scoring at least a threshold")
    sp.add_argument("left", metavar="LEFT", help="a collection, COLLECTION/FOLDER, or all")
    sp.add_argument("right", metavar="RIGHT", help="a collection, COLLECTION/FOLDER, or all (the same as LEFT: a "
                                                   "self-join, each pair once)")
    lake_arg(sp)
    sp.add_argument("--measure", choices=MEASURES, default="mix")
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument("--k", type=int, help="kNN join: the k best in RIGHT for every image of LEFT")
    how.add_argument("--threshold", type=float, help="range join: every pair scoring at least this (0..1)")
    sp.add_argument("--out", help="write the pairs to this file: .parquet (default) or .csv")
    sp.add_argument("--max-pairs", type=int, default=5_000_000, help="stop with an error beyond this many pairs")
    sp.add_argument("--json", action="store_true", help='print {"pairs": [...], "timings_ms": {...}}')
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--progress", action="store_true", help="progress bar even when not on a terminal")
    sp.add_argument("--progress-json", action="store_true", help="one JSON line per progress update (the app)")
    sp.set_defaults(func=cmd_join)

    sp = sub.add_parser("serve", help="serve the lake: the HTTP API (--api) or the app, on 127.0.0.1 by default")
    lake_arg(sp)
    sp.add_argument("--api", action="store_true", help="the HTTP API (FastAPI + uvicorn) instead of the app")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; beyond it, the API needs a key "
                         "and the app runs in shared mode)")
    sp.add_argument("--port", type=int, help="port (default 8000 for the API, 8501 for the app)")
    sp.add_argument("--api-key", help="the key every API request must carry (default: $IMGREC_API_KEY)")
    sp.add_argument("--max-request-mb", type=float, default=64.0, help="largest API request body (default 64 MB)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("models", help="the embedding models offered, whether each is usable here (nothing is "
                                       "downloaded), and the lake's")
    lake_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("stats", help="counts per collection and the skipped files with their reasons")
    lake_arg(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imgrec.features.embed import ModelUnavailable
    from imgrec.imaging import ImageError
    from imgrec.lake import LakeError
    from imgrec.storage import StorageError

    try:
        return int(args.func(args) or 0)
    except (LakeError, ImageError, StorageError, ModelUnavailable, NotADirectoryError, FileNotFoundError,
            PermissionError) as exc:
        print(f"imgrec: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # QueryError and other input errors
        print(f"imgrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like; any other broken pipe is an error
        if not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
