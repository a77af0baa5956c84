"""Where the time goes: statistics over the engine's search history, ingestion throughput from the ``runs`` table, the
cold start of a fresh process (imports, index open, DuckDB, model load, first search), and a sampling profile
(pyinstrument) of one search.

Pure functions apart from I/O; only the standard library is imported at module level, so that the cold-start child
(``python -m imgrec.profiling cold-start --lake DIR``) can time every other import itself. No streamlit here: the
Profiling page and the CLI read the same numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

_MODULE_T0 = time.perf_counter()  # the cold-start child's clock starts here (CLOCK_MONOTONIC: shared with the parent)

if TYPE_CHECKING:
    from imgrec.search import Engine, Query, SearchResponse

SEARCH_STAGES = ("setup", "decode", "features", "expand", "candidates", "rerank", "metadata", "render", "total")
MEASURE_ORDER = ("color", "hash", "embedding", "mix")
INGEST_STAGES = ("scan", "read", "decode", "resize", "color", "hash", "thumbnail", "preprocess", "model_load", "embed",
                 "write", "compact", "index")
COLD_PARTS = ("interpreter", "imports", "index_open", "duckdb", "model_load", "first_search", "other")
UPLOADS, LAKE_IMAGES = "uploads", "lake images"  # query kinds: decoded + embedded, or stored features
COLD_START_MARK = "IMGREC_COLD_START "  # prefix of the child's JSON line on stdout
COLD_IMPORTS = ("numpy", "PIL.Image", "usearch.index", "imgrec.search")  # what a search imports (DuckDB, polars and
# pyarrow load later, where a search needs them: see the "duckdb" part and the first search's stages)


class ColdStartError(RuntimeError):
    """The cold-start child process failed (its stderr is in the message)."""


# --- search history ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def query_kind(entry: dict[str, Any]) -> str:
    """``uploads`` when any query image had to be decoded and embedded, else ``lake images`` (stored features)."""
    return UPLOADS if int(entry.get("uploads") or 0) > 0 else LAKE_IMAGES


def _stage_key(stage: str) -> tuple[int, str]:
    """Pipeline order; stages the engine does not know (added by callers) go before ``total``."""
    if stage in SEARCH_STAGES:
        return SEARCH_STAGES.index(stage), stage
    return SEARCH_STAGES.index("total") - 1, stage


def _measure_key(measure: str) -> tuple[int, str]:
    return (MEASURE_ORDER.index(measure) if measure in MEASURE_ORDER else len(MEASURE_ORDER)), measure


def sort_stages(stages: Iterable[str]) -> list[str]:
    """Search stages in pipeline order (``SEARCH_STAGES``; others just before ``total``)."""
    return sorted(set(stages), key=_stage_key)


def stage_stats(history: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per query kind, measure and stage: count, p50, p95, mean and max in ms.

    ``history`` is ``Engine.history()``. Rows come in order: ``lake images`` before ``uploads``, measures as in
    ``MEASURE_ORDER``, stages in pipeline order (``SEARCH_STAGES``). A stage missing from a search (``render`` of a
    search made outside the app) is not counted for it.
    """
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for entry in history:
        kind, measure = query_kind(entry), str(entry.get("measure", "?"))
        for stage, ms in (entry.get("timings_ms") or {}).items():
            groups[(kind, measure, stage)].append(float(ms))
    rows = []
    for (kind, measure, stage), values in groups.items():
        rows.append({"kind": kind, "measure": measure, "stage": stage, "count": len(values),
                     "p50": round(percentile(values, 50), 3), "p95": round(percentile(values, 95), 3),
                     "mean": round(sum(values) / len(values), 3), "max": round(max(values), 3)})
    rows.sort(key=lambda r: (r["kind"] != LAKE_IMAGES, _measure_key(r["measure"]), _stage_key(r["stage"])))
    return rows


def query_stage_rows(history: Sequence[dict[str, Any]], last: int = 30) -> list[dict[str, Any]]:
    """The last ``last`` searches in long form, one row per stage (``total`` left out): for stacked bars."""
    rows = []
    for entry in list(history)[-last:]:
        kind = query_kind(entry)
        label = f"#{entry.get('query_id')} {entry.get('measure')} · {'upload' if kind == UPLOADS else 'lake'}"
        for stage, ms in (entry.get("timings_ms") or {}).items():
            if stage == "total":
                continue
            rows.append({"query_id": entry.get("query_id"), "query": label, "measure": entry.get("measure"),
                         "kind": kind, "stage": stage, "order": _stage_key(stage)[0], "ms": float(ms)})
    return rows


def sample_searches(engine: Engine, per_measure: int = 4, uploads: int = 1, *, k: int = 10,
                    measures: Sequence[str] = MEASURE_ORDER, seed: int | None = None) -> list[SearchResponse]:
    """A few real searches per measure with random images of the lake, to fill ``engine.history()``.

    ``per_measure`` searches by image id (stored features) and ``uploads`` searches with the bytes of an image's
    file (decoded and embedded like a new photo; skipped when the file is gone).
    """
    rng = random.Random(seed)
    n = max(1, per_measure + uploads)
    rows = engine.sample(n * len(measures), seed=rng.randrange(1_000_000))
    if not rows:
        return []
    out = []
    for mi, measure in enumerate(measures):
        picks = [rows[(mi * n + j) % len(rows)] for j in range(n)]
        for j, row in enumerate(picks):
            # plain ids and bytes rather than Query objects: a reloaded imgrec.search (Streamlit's file watcher)
            # would have a Query class the engine's module does not recognise
            q: int | bytes = int(row["image_id"])
            if j >= per_measure:
                try:
                    q = Path(row["path"]).read_bytes()
                except OSError:
                    continue
            out.append(engine.search([q], measure=measure, k=k, exclude_query=True))
    return out


# --- ingestion runs ---------------------------------------------------------------------------------------------


def _cursor(source: Any) -> Any:
    """A DuckDB cursor/connection from an Engine, a LakeConnection or a DuckDB connection."""
    if hasattr(source, "cursor") and hasattr(source, "lake") and hasattr(source, "history"):  # an Engine
        return source.cursor()
    if hasattr(source, "con") and hasattr(source, "snapshot"):  # a LakeConnection
        return source.con
    return source


def ingest_runs(source: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` ingestion runs (oldest first), parsed from the lake's ``runs`` table.

    Each: run_id, started_at, finished_at, seconds, images (processed), scanned, unchanged, relinked, skipped,
    removed, images_per_s, workers, device, interrupted, snapshot, ``stages`` (seconds; worker stages are summed over
    workers), ``ms_per_image`` and ``share`` (of the summed stage time) per stage, stages in pipeline order.
    """
    cur = _cursor(source)
    rows = cur.execute("SELECT run_id, started_at, finished_at, stats FROM runs "
                       "ORDER BY started_at DESC LIMIT ?", [int(limit)]).fetchall()
    out = []
    for run_id, started, finished, stats in reversed(rows):
        try:
            s = json.loads(stats) if stats else {}
        except ValueError:
            s = {}
        stages = {k: float(v) for k, v in sorted((s.get("stages") or {}).items(),
                                                  key=lambda kv: _ingest_stage_key(kv[0]))}
        processed = int(s.get("processed") or 0)
        seconds = float(s.get("seconds") or 0.0)
        summed = sum(stages.values())
        out.append({
            "run_id": run_id, "started_at": started, "finished_at": finished, "seconds": round(seconds, 3),
            "images": processed, "scanned": int(s.get("scanned") or 0), "unchanged": int(s.get("unchanged") or 0),
            "relinked": int(s.get("relinked") or 0), "skipped": int(s.get("skipped") or 0),
            "removed": int(s.get("removed") or 0),
            "images_per_s": round(float(s.get("images_per_s") or (processed / seconds if seconds else 0.0)), 2),
            "workers": int(s.get("workers") or 1), "device": s.get("device") or "?",
            "interrupted": bool(s.get("interrupted")), "snapshot": s.get("snapshot"),
            "stages": stages,
            "ms_per_image": {k: round(v * 1000.0 / processed, 3) for k, v in stages.items()} if processed else {},
            "share": {k: round(v / summed, 4) for k, v in stages.items()} if summed > 0 else {},
        })
    return out


def _ingest_stage_key(stage: str) -> tuple[int, str]:
    return (INGEST_STAGES.index(stage) if stage in INGEST_STAGES else len(INGEST_STAGES)), stage


def sort_ingest_stages(stages: Iterable[str]) -> list[str]:
    """Ingestion stages in pipeline order (``INGEST_STAGES``; others at the end)."""
    return sorted(set(stages), key=_ingest_stage_key)


def ingest_stage_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ingest_runs`` in long form, one row per run and stage: for stacked bars."""
    rows = []
    for r in runs:
        label = f"{str(r['started_at'])[:19]} · {r['run_id'][:6]}"
        for stage, seconds in r["stages"].items():
            rows.append({"run": label, "run_id": r["run_id"], "stage": stage, "order": _ingest_stage_key(stage)[0],
                         "seconds": seconds, "ms_per_image": r["ms_per_image"].get(stage),
                         "share": r["share"].get(stage)})
    return rows


# --- cold start -------------------------------------------------------------------------------------------------


def _ms(t0: float, t1: float | None = None) -> float:
    return round(((time.perf_counter() if t1 is None else t1) - t0) * 1000.0, 1)


def cold_start(lake: str | os.PathLike[str], measure: str = "mix", query: Any = None, *, k: int = 5,
               timeout: float = 300.0) -> dict[str, Any]:
    """A new process -> first result, with its breakdown in ms.

    Runs ``python -m imgrec.profiling cold-start`` in a fresh interpreter and returns what it measured:
    ``parts_ms`` (``COLD_PARTS``: interpreter start, imports, index open, DuckDB, model load -- torch import +
    weights, only when the query needs the embedding --, first search, other), ``details_ms`` (each import, the
    model's parts, the first search's stages), ``total_ms`` (from just before the parent spawned the process to the
    first result), ``process_ms`` (to the process's exit), ``needs_model`` and ``first_result``.

    ``query``: None (default) -- a copy of the lake's first image in a temporary folder outside the lake, so that it
    is decoded and embedded like a new photo; a file path; image bytes; an image id (``int`` or ``"id:N"``: stored
    features, no model).
    """
    from imgrec.config import resolve_lake
    from imgrec.lake import Lake

    root = resolve_lake(lake)
    if not Lake(root).exists:
        raise FileNotFoundError(f"there is no lake at {root}")
    with tempfile.TemporaryDirectory(prefix="imgrec-cold-start-") as tmp:
        qarg, described = _query_arg(root, query, Path(tmp))
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TQDM_DISABLE", "1")
        cmd = [sys.executable, "-m", "imgrec.profiling", "cold-start", "--lake", str(root), "--measure", measure,
               "--query", qarg, "--k", str(int(k))]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--t0", repr(t0)], capture_output=True, text=True, timeout=timeout, env=env)
        process_ms = _ms(t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(COLD_START_MARK)]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ColdStartError(f"the cold-start process exited with code {proc.returncode}: {tail}")
    out = json.loads(lines[-1][len(COLD_START_MARK):])
    if out.get("error"):
        raise ColdStartError(out["error"])
    out["process_ms"] = process_ms
    out["query"] = described
    return out


def _query_arg(lake: Path, query: Any, tmp: Path) -> tuple[str, str]:
    """The child's ``--query`` and a description of it; files to decode are put in ``tmp``."""
    if isinstance(query, bool):
        raise TypeError("a query is a file, image bytes or an image id")
    if isinstance(query, int):
        return f"id:{query}", f"image id {query} (stored features)"
    if isinstance(query, bytes | bytearray):
        path = tmp / "query-image"
        path.write_bytes(bytes(query))
        return str(path), f"uploaded bytes ({len(query):,} B)"
    if isinstance(query, str) and query.startswith("id:") and query[3:].isdigit():
        return query, f"image id {query[3:]} (stored features)"
    if query is not None:
        return os.path.abspath(os.fspath(query)), f"file {os.fspath(query)}"
    from imgrec.lake import Lake

    conn = Lake(lake).connect()
    try:
        rows = conn.sql("SELECT image_id, path, relpath FROM images ORDER BY image_id LIMIT 20")
    finally:
        conn.close()
    for image_id, path, relpath in rows:
        src = Path(path)
        if src.is_file():
            dst = tmp / f"query{src.suffix.lower()}"
            shutil.copyfile(src, dst)
            return str(dst), f"a copy of {relpath} (image {image_id}) outside the lake: decoded and embedded"
    if rows:  # no file at hand: the stored features of the first image
        return f"id:{rows[0][0]}", f"image id {rows[0][0]} (stored features; its file is gone)"
    raise ValueError(f"the lake {lake} has no images")


def _cold_start_child(lake: str, measure: str, query: str, k: int, t_parent: float | None) -> dict[str, Any]:
    """What the fresh process measures (run by ``main``); times in ms from the shared monotonic clock."""
    t_top = _MODULE_T0
    parts: dict[str, float] = {}
    details: dict[str, dict[str, float]] = {}
    imports = {}
    for name in COLD_IMPORTS:
        t = time.perf_counter()
        importlib.import_module(name)
        imports[name] = _ms(t)
    parts["imports"] = round(sum(imports.values()), 1)
    details["imports"] = imports

    from imgrec.config import Config
    from imgrec.search import Engine, Query

    t = time.perf_counter()
    engine = Engine(Config.load(lake))
    engine_ms = _ms(t)
    if engine.index is None or engine.size == 0:
        raise ValueError(f"the lake {lake} has no images")
    weights = engine.config.weights
    measures = [m for m in weights if weights[m] > 0] if measure == "mix" else [measure]
    t = time.perf_counter()
    if "embedding" in measures:
        engine.index.searcher.warm("embedding")  # restored lazily by the first search otherwise
    if "color" in measures:
        engine.index.searcher.warm("color" if engine.index.layout is None else "layout")
    hnsw_ms = _ms(t)
    parts["index_open"] = round(engine.open_ms.get("index_open", 0.0) + hnsw_ms, 1)
    details["index_open"] = {"memory_map": engine.open_ms.get("index_open", 0.0), "hnsw_restore": hnsw_ms,
                             "engine_other": round(max(engine_ms - sum(engine.open_ms.values()), 0.0), 1)}

    q = Query.of(query)
    if q.path is not None and engine.lookup_paths([q.path]):
        needs_model = False  # an unchanged file of the lake: its stored features
    else:
        needs_model = q.image_id is None and "embedding" in measures
    if needs_model:
        from imgrec.features.runtime import resolve

        backend, _ = resolve(engine.config.backend, engine.config.device, engine.index.meta["model"]["name"])
        t = time.perf_counter()
        importlib.import_module("onnxruntime" if backend == "onnx" else "torch")
        runtime_ms = _ms(t)
        t = time.perf_counter()
        engine.embedder()
        weights_ms = _ms(t)
        parts["model_load"] = round(runtime_ms + weights_ms, 1)
        details["model_load"] = {f"{backend}_import": runtime_ms, "weights": weights_ms}

    t = time.perf_counter()
    resp = engine.search([q], measure=measure, k=k)
    t_end = time.perf_counter()
    parts["duckdb"] = round(engine.open_ms.get("duckdb", 0.0), 1)  # opened by the search where it needed it, else 0
    parts["first_search"] = round(_ms(t, t_end) - parts["duckdb"], 1)
    details["first_search"] = dict(resp.timings_ms)
    child_ms = _ms(t_top, t_end)
    total_ms = _ms(t_parent, t_end) if t_parent is not None else child_ms
    if t_parent is not None:
        parts["interpreter"] = _ms(t_parent, t_top)
    parts["other"] = round(max(total_ms - sum(parts.values()), 0.0), 1)
    first = resp.results[0] if resp.results else None
    return {
        "lake": lake, "measure": measure, "distance": resp.distance, "k": k, "needs_model": needs_model,
        "size": engine.size, "device": engine.embedder().device if needs_model else None,
        "backend": getattr(engine.embedder(), "backend", None) if needs_model else None,
        "torch_imported": "torch" in sys.modules,
        "parts_ms": {p: parts[p] for p in COLD_PARTS if p in parts},
        "details_ms": details, "total_ms": total_ms, "child_ms": child_ms,
        "results": len(resp.results),
        "first_result": {"image_id": first.image_id, "relpath": first.relpath, "score": round(first.score, 4)}
        if first else None,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }


# --- sampling profile of one search -----------------------------------------------------------------------------


def profile_search(engine: Engine, queries: Sequence[Query | str | bytes | int], measure: str = "mix", k: int = 10,
                   *, interval: float = 0.0005, repeat: int = 1, top: int = 20, html: bool = False,
                   **search_kwargs: Any) -> dict[str, Any]:
    """Run one search (``repeat`` times) under pyinstrument; the functions it spent its time in.

    Returns ``response`` (the last SearchResponse), ``duration_ms``, ``samples``, ``top_self`` and
    ``top_cumulative`` (rows: function, location ``file:line``, ms, share of the profiled time, app -- False for
    library code), ``text`` (pyinstrument's tree) and, with ``html=True``, ``html`` (its interactive page).
    The searches are real: they are also remembered in ``engine.history()``.
    """
    from pyinstrument import Profiler

    profiler = Profiler(interval=interval, async_mode="disabled")
    resp = None
    profiler.start()
    try:
        for _ in range(max(1, int(repeat))):
            resp = engine.search(queries, measure=measure, k=k, **search_kwargs)
    finally:
        session = profiler.stop()
    root = session.root_frame()
    self_rows, cum_rows = _top_functions(root, top) if root is not None else ([], [])
    out: dict[str, Any] = {
        "response": resp, "measure": measure, "repeat": max(1, int(repeat)),
        "duration_ms": round(session.duration * 1000.0, 3), "samples": session.sample_count,
        "interval_ms": interval * 1000.0, "top_self": self_rows, "top_cumulative": cum_rows,
        "text": profiler.output_text(unicode=True, color=False),
    }
    if html:
        out["html"] = profiler.output_html()
    return out


def _top_functions(root: Any, top: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Self and cumulative time per function (recursion counted once), by walking pyinstrument's frame tree."""
    total = root.time or 1e-12
    self_s: dict[tuple[str, str, int], float] = defaultdict(float)
    cum_s: dict[tuple[str, str, int], float] = defaultdict(float)
    info: dict[tuple[str, str, int], dict[str, Any]] = {}
    here = os.path.abspath(__file__)
    repo = os.path.dirname(os.path.dirname(here)) + os.sep
    stack: list[tuple[Any, frozenset[tuple[str, str, int]]]] = [(root, frozenset())]
    while stack:
        frame, above = stack.pop()
        if frame.is_synthetic:  # [self], [await], ...: already in the parent's self time
            continue
        key = (frame.function, frame.file_path or "", frame.line_no or 0)
        mine = key[1] == here or "pyinstrument" in key[1]  # the profiler's own frames
        if not mine:
            self_s[key] += frame.total_self_time
            if key not in above:
                cum_s[key] += frame.time
            if key not in info:
                cls = frame.class_name
                where = key[1]
                if "site-packages" + os.sep in where:  # a library: from its package on
                    where = where.rsplit("site-packages" + os.sep, 1)[1]
                elif where.startswith(repo):  # imgrec's own files: relative to the checkout, whatever sys.path is
                    where = where[len(repo):]
                elif frame.file_path_short:
                    where = frame.file_path_short
                info[key] = {"function": f"{cls}.{frame.function}" if cls else frame.function,
                             "location": f"{where}:{key[2]}" if key[2] else where,
                             "app": bool(frame.is_application_code)}
        stack.extend((child, above | {key}) for child in frame.children)

    def rows(times: dict[tuple[str, str, int], float]) -> list[dict[str, Any]]:
        best = sorted(((s, key) for key, s in times.items() if s > 0), key=lambda x: -x[0])[:top]
        return [{**info[key], "ms": round(s * 1000.0, 3), "share": round(s / total, 4)} for s, key in best]

    return rows(self_s), rows(cum_s)


# --- entry point ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imgrec.profiling cold-start --lake DIR [--measure M] [--query FILE|id:N] [--k K]``: prints JSON."""
    parser = argparse.ArgumentParser(prog="python -m imgrec.profiling")
    sub = parser.add_subparsers(dest="command", required=True)
    cs = sub.add_parser("cold-start", help="time a new process's first search (imports, index, DuckDB, model)")
    cs.add_argument("--lake", required=True)
    cs.add_argument("--measure", default="mix")
    cs.add_argument("--query", default=None, help="image file or id:N (default: a copy of the lake's first image)")
    cs.add_argument("--k", type=int, default=5)
    cs.add_argument("--t0", type=float, default=None, help="the parent's perf_counter() just before the spawn")
    args = parser.parse_args(argv)
    if args.query is None:  # run by hand: let the parent-side helper pick and copy the query, in a child of ours
        result = cold_start(args.lake, args.measure, k=args.k)
        print(json.dumps(result, indent=1, default=str))
        return 0
    try:
        result = _cold_start_child(args.lake, args.measure, args.query, args.k, args.t0)
    except Exception as exc:
        print(COLD_START_MARK + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(COLD_START_MARK + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
