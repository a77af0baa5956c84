"""Cold start: a new process -> first result, with its breakdown (``imgrec.profiling.cold_start``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgrec.bench.common import Log, stats
from imgrec.profiling import COLD_PARTS


def bench_cold(lake: Path, photo: Path | None, runs: int, *, measure: str = "mix", stored: bool = True,
               log: Log = lambda s: None) -> dict[str, Any]:
    """``runs`` cold starts with a new photo (decoded and embedded: torch imported, model loaded), and, with
    ``stored``, one with an image of the lake (``id:N``: stored features, no model). Medians per part."""
    from imgrec.profiling import cold_start

    query: Any = photo.read_bytes() if photo is not None else None
    out: dict[str, Any] = {"measure": measure, "runs": []}
    for i in range(max(1, runs)):
        r = cold_start(lake, measure, query)
        out["runs"].append(_slim(r))
        log(f"  cold start {i + 1}/{runs}: {r['total_ms'] / 1000:.2f} s ({r['query']})")
    out["photo"] = _summary(out["runs"])
    if stored:
        from imgrec.index import IndexSet
        from imgrec.lake import Lake

        first = int(IndexSet.open(Lake(lake)).ids[0])
        r = cold_start(lake, measure, f"id:{first}")
        out["stored"] = _summary([_slim(r)])
        log(f"  cold start, stored features: {r['total_ms'] / 1000:.2f} s")
    return out


def _slim(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in ("total_ms", "process_ms", "parts_ms", "details_ms", "needs_model", "query", "size",
                                  "device", "results")}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    parts = {p: stats([r["parts_ms"].get(p, 0.0) for r in runs])["p50"] for p in COLD_PARTS
             if any(p in r["parts_ms"] for r in runs)}
    return {"runs": len(runs), "total_ms": stats([r["total_ms"] for r in runs]), "parts_p50_ms": parts,
            "needs_model": runs[0].get("needs_model"), "query": runs[0].get("query"),
            "model_load_ms": runs[0].get("details_ms", {}).get("model_load")}
