"""The benchmark's targets, and its report as JSON and as Markdown tables (each figure beside its target)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from imgrec.measures import MEASURES

REPORTS_ENV = "IMGREC_BENCH_REPORTS"

TARGET_N = 400_000  # the targets are stated for a collection of this size
INGEST_TARGETS = {"oxford_flowers17": 70.0, "dogs_vs_cats_200px": 110.0}  # img/s with 2 workers on 2 cores


def _row(name: str, value: float | None, op: str, target: float, unit: str, n: int | None = None,
         where: str = "") -> dict[str, Any]:
    ok = None if value is None or (isinstance(value, float) and math.isnan(value)) else (
        value <= target if op == "<=" else value >= target)
    return {"figure": name, "value": value, "op": op, "target": target, "unit": unit, "n": n, "where": where,
            "status": "n/a" if ok is None else ("pass" if ok else "FAIL")}


def _at_target_n(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry at TARGET_N, else the largest N measured."""
    if not entries:
        return None
    exact = [e for e in entries if e.get("n") == TARGET_N]
    return exact[0] if exact else max(entries, key=lambda e: e.get("n") or 0)


def _run(entry: dict[str, Any], measure: str, images: int, variant: str = "default") -> dict[str, Any] | None:
    for r in entry.get("runs", []):
        if r["measure"] == measure and r["images"] == images and r["variant"] == variant:
            return r
    return None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue with the figure it is judged on (at N = 400,000, else the largest N run)."""
    rows: list[dict[str, Any]] = []
    search = _at_target_n([s for s in report.get("search", []) if s.get("runs")])
    if search:
        n = search["n"]
        for images, limit in ((1, 5.0), (5, 20.0)):
            for m in MEASURES:
                r = _run(search, m, images)
                if r:
                    rows.append(_row(f"search stage p50, {images} image{'s' * (images > 1)}, {m}",
                                     r["total_ms"]["p50"], "<=", limit, "ms", n))
        r = _run(search, "embedding", 1, "no_expand") or _run(search, "embedding", 1)
        if r and "recall" in r:
            rows.append(_row("embedding recall@10 vs exact, 1 image" + (" (no expansion)" if r["variant"] ==
                             "no_expand" else ""), r["recall"], ">=", 0.95, "", n))
        mem = search.get("memory_mb", {})
        peak = mem.get("e2e") or mem.get("searched") or {}
        if peak:
            rows.append(_row("RSS of the searching process" + (" (model loaded)" if "e2e" in mem else ""),
                             peak.get("rss"), "<=", 2048.0, "MB", n))
        build = search.get("index") or {}
        if build.get("seconds") is not None:
            rows.append(_row("index build", build["seconds"], "<=", 600.0, "s", n))
    e2e = _at_target_n([e for e in report.get("e2e", []) if e.get("rows")])
    if e2e:
        for row in e2e["rows"]:  # mix, the default measure, has the stricter targets of the CPU work (issue 11)
            limit = {1: 100.0, 5: 300.0}[row["images"]] if row["measure"] != "mix" else {1: 30.0, 5: 100.0}[
                row["images"]]
            rows.append(_row(f"end to end warm p50, {row['images']} upload{'s' * (row['images'] > 1)}, "
                             f"{row['measure']}", row["wall_ms"]["p50"], "<=", limit, "ms", e2e["n"]))
    cold = report.get("cold_start") or {}
    if cold.get("photo"):
        rows.append(_row(f"cold start, a new photo, {cold['measure']}", round(cold["photo"]["total_ms"]["p50"] / 1000, 3),
                         "<=", 1.5, "s", cold.get("n")))
    for ing in report.get("ingestion", []):
        if "images_per_s" in ing:
            limit = INGEST_TARGETS.get(ing["set"], 40.0) if ing["workers"] >= 2 else 40.0
            rows.append(_row(f"ingestion, {ing['set']}, {ing['workers']} worker{'s' * (ing['workers'] > 1)} "
                             "(steady)", ing["steady_images_per_s"], ">=", limit, "img/s",
                             where=f"{ing['images']} images; overall {ing['images_per_s']} img/s"))
    for r in rows:
        if r["n"] is not None and r["n"] != TARGET_N:
            r["where"] = (r["where"] + "; " if r["where"] else "") + f"measured at N={r['n']:,}, target for 400,000"
    return rows


def reports_dir() -> Path:
    """Where the app looks for bench reports: ``$IMGREC_BENCH_REPORTS``, else the project's ``docs/bench``."""
    return Path(os.environ.get(REPORTS_ENV) or Path(__file__).resolve().parents[2] / "docs" / "bench")


def list_reports(folder: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """The readable bench reports (``*.json``) of ``folder``, newest run first; unreadable files are left out."""
    found = []
    for path in sorted((folder or reports_dir()).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "machine" in data and "mode" in data:
            found.append((path, data))
    return sorted(found, key=lambda pd: str(pd[1].get("started_at", "")), reverse=True)


def write(report: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    return js, md


# --- Markdown ------------------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out + [""]


def markdown(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    lines = [f"# imgrec benchmark ({report.get('mode')})", "",
             f"Run {report.get('started_at', '?')[:19]} in {_f(report.get('seconds'))} s on {m.get('cpus')} CPU cores "
             f"({m.get('cpu', '?')}{', ' + m['cpu_id'] if m.get('cpu_id') else ''}; "
             f"{', '.join(m.get('vector_extensions') or []) or 'vector extensions unknown'}), "
             f"{m.get('memory_gb', '?')} GB, {m.get('accelerator', 'no GPU')}; Python "
             f"{m.get('python')}, commit {m.get('commit', '?')}; load average {m.get('load_start', '?')} at the "
             f"start, {m.get('load_end', '?')} at the end (other work on the cores stretches every figure). "
             "Source of real features: "
             f"{report.get('source', {}).get('description', '?')}.", ""]
    if report.get("targets"):
        lines += ["## Targets", ""]
        lines += _table(["figure", "measured", "target", "status", "note"], [
            [t["figure"], f"{_f(t['value'], 3 if t['unit'] == '' else 1)} {t['unit']}".strip(),
             f"{t['op']} {t['target']:g} {t['unit']}".strip(), "**FAIL**" if t["status"] == "FAIL" else t["status"],
             t["where"]] for t in report["targets"]])
    if report.get("search"):
        lines += ["## Search stage", "",
                  "Images of the lake searched by id (features in hand -> top 10 with metadata, query images "
                  "excluded), the engine's `timings_ms.total`. `exact` is the same search by brute force in numpy "
                  "over the index's stored vectors (`IndexSet.embeddings`, `.color`, `.hashes` as float32 in "
                  "memory, the engine's distances and soft minimum, the same metadata lookup); `speed-up` = exact "
                  "p50 / engine p50. Recall@10 (ties counted) is against the exact answer: for a single measure "
                  "without expansion the numpy brute force's top 10 (every query), for mix and expanded queries the "
                  "engine itself with every image of the lake as a candidate (the first 30 queries: it is slow), so "
                  "scoring, mix normalisation and expansion are the same on both sides and only the candidate "
                  "search differs; `numpy = exhaustive` checks on 5 queries that numpy's top 10 is the exhaustive "
                  "engine's. 5-image queries are "
                  "related images (a random image and 4 of its 20 nearest by embedding), as a person picks them. "
                  "`default` is the search as the app runs it, `no_expand` without query expansion.", ""]
        rows = []
        for s in report["search"]:
            for r in s.get("runs", []):
                rows.append([s["n"], r["measure"], r["variant"], r["images"], r["total_ms"]["p50"],
                             r["total_ms"]["p95"], r.get("exact_ms", {}).get("p50"), r.get("speedup_p50"),
                             _f3(r.get("recall")), _f3(r.get("recall_min")), _f3(r.get("numpy_agreement"))])
        lines += _table(["N", "measure", "variant", "images", "p50 ms", "p95 ms", "exact p50 ms", "speed-up",
                         "recall@10", "min recall", "numpy = exhaustive"], rows)
        rows = []
        for s in report["search"]:
            ix, mem = s.get("index") or {}, s.get("memory_mb", {})
            bs = ix.get("build_seconds", {})
            rows.append([s["n"], s.get("embedding_dims"), ix.get("seconds"),
                         ", ".join(f"{k} {_f(v)}" for k, v in bs.items() if k != "total") or "-",
                         "cached" if ix.get("cached") else "this run", ix.get("peak_rss_mb"),
                         (ix.get("bytes") or 0) / 1e6, mem.get("searched", {}).get("rss"),
                         mem.get("searched", {}).get("anon"), mem.get("searched", {}).get("file"),
                         mem.get("e2e", {}).get("rss"), mem.get("exact", {}).get("peak")])
        lines += ["Index and memory per N (RSS of the searching process in MB, from /proc/self/status: after the "
                  "searches, anonymous / file-backed -- the memory-mapped index -- parts, then with the embedding "
                  "model loaded for the uploads, then the peak once the exact matrices were loaded too):", ""]
        lines += _table(["N", "embedding dims", "index build s", "build parts s", "built", "build peak RSS MB",
                         "index MB", "RSS MB", "anon MB", "file MB", "RSS + model MB", "peak with exact MB"], rows)
        synth = [s["synth"] for s in report["search"] if s.get("synth")]
        if synth:
            lines += ["Synthetic collections (`imgrec/bench/synth.py`): the first pass over the source keeps its real "
                      "features; every further row is a copy of a real image, its embedding plus Gaussian noise "
                      "drawn in the span of the source's top principal axes with their own variances (the way real "
                      "photos vary), scaled so a copy is as close to its source as a real photo is to its nearest "
                      "real neighbour, re-normalised; colour histogram x (1 + N(0, 0.1)) re-normalised; 0-4 bits "
                      "of each hash flipped; real metadata and thumbnails, fake paths. Written through LakeWriter "
                      "and indexed by build_indexes.", ""]
            lines += _table(["N", "source images", "copies per source", "real NN cosine (median)",
                             "copy-source cosine (mean)", "made in s", "lake MB"],
                            [[x["n"], x["source_images"], x["copies_per_source"], _f3(x["real_nn_cosine_median"]),
                              _f3(x.get("copy_cosine_mean")), x["seconds"], x["lake_bytes"] / 1e6] for x in synth])
    if report.get("e2e"):
        lines += ["## End to end, warm", "",
                  "Real photos as bytes -> 5 results with paths and thumbnails (`Engine.search` + "
                  "`Engine.thumbnails`), warm engine and model, each upload distinct (decoded and embedded, never "
                  "from the upload cache). Stage p50s in ms.", ""]
        stages = ["decode", "features", "expand", "candidates", "rerank", "metadata", "thumbnails"]
        rows = []
        for e in report["e2e"]:
            for r in e.get("rows", []):
                rows.append([e["n"], r["measure"], r["images"], r["wall_ms"]["p50"], r["wall_ms"]["p95"],
                             *[r["stages_p50_ms"].get(s) for s in stages]])
        lines += _table(["N", "measure", "uploads", "p50 ms", "p95 ms", *stages], rows)
    cold = report.get("cold_start")
    if cold and cold.get("photo"):
        lines += ["## Cold start", "",
                  f"A new process -> first result (`imgrec.profiling.cold_start`), {cold['measure']}, on the "
                  f"N={_f(cold.get('n'))} lake, files in the page cache; p50 of the parts in ms.", ""]
        parts = list(cold["photo"]["parts_p50_ms"])
        rows = [["a new photo", cold["photo"]["runs"], cold["photo"]["total_ms"]["p50"],
                 *[cold["photo"]["parts_p50_ms"].get(p) for p in parts]]]
        if cold.get("stored"):
            rows.append(["an image of the lake (stored features)", 1, cold["stored"]["total_ms"]["p50"],
                         *[cold["stored"]["parts_p50_ms"].get(p) for p in parts]])
        lines += _table(["query", "runs", "total ms", *parts], rows)
    if report.get("ingestion"):
        lines += ["## Ingestion", "",
                  "`imgrec ingest` into a new lake (a new process). Images/s overall (model load included) and "
                  "steady (without the model load and the scan); stages in ms per image, worker stages summed "
                  "over workers (CPU time).", ""]
        stages = ["read", "decode", "color", "hash", "thumbnail", "preprocess", "embed", "write", "model_load"]
        rows = [[i["set"], i["images"], i["workers"], i["images_per_s"], i["steady_images_per_s"], i["seconds"],
                 *[i["ms_per_image"].get(s) for s in stages]] for i in report["ingestion"] if "images" in i]
        lines += _table(["set", "images", "workers", "images/s", "steady images/s", "seconds", *stages], rows)
    notes = report.get("notes", [])
    errors = report.get("errors", [])
    if notes or errors:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [f"- **error** in {e['section']}: {e['error']}"
                                                                  for e in errors] + [""]
    return "\n".join(lines)
