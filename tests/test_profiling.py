"""imgrec.profiling and the Profiling page, against a real lake ingested from synthetic images (no mocks): stage
statistics, ingestion runs, a cold start in a fresh process, a pyinstrument profile of a search, and the page in
AppTest on a missing and on a filled lake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ingest_quietly, make_collection
from streamlit.testing.v1 import AppTest

from imgrec import profiling as prof
from imgrec.config import Config

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
PAGE = "pages/3_Profiling.py"
TIMEOUT = 90  # seconds per script run (sample searches with uploads load the model)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake of 12 synthetic photos."""

    base = tmp_path_factory.mktemp("proflake")
    make_collection(base / "pictures", n=12)
    lake = base / "lake"
    report = ingest_quietly(base / "pictures", lake)
    assert report.processed == 12
    return lake


@pytest.fixture(scope="module")
def engine(lake: Path) -> Iterator[object]:
    from imgrec.search import Engine

    eng = Engine(Config.load(lake))
    yield eng
    eng.close()


# --- search history -----------------------------------------------------------------------------------------------


def _entry(i: int, measure: str, uploads: int, **timings: float) -> dict[str, object]:
    return {"query_id": i, "at": 0.0, "measure": measure, "uploads": uploads, "timings_ms": dict(timings)}


def test_percentile_matches_linear_interpolation() -> None:
    xs = [float(v) for v in range(1, 101)]
    assert prof.percentile(xs, 50) == pytest.approx(50.5)
    assert prof.percentile(xs, 95) == pytest.approx(95.05)
    assert prof.percentile([7.0], 95) == 7.0
    assert prof.percentile([3.0, 1.0], 50) == 2.0


def test_stage_stats_per_kind_measure_and_stage() -> None:
    history = [_entry(i, "color", 0, total=i + 1, decode=0, candidates=float(i + 1), setup=1) for i in range(100)]
    history += [_entry(100 + i, "embedding", 1, total=10.0 * (i + 1), decode=2.0 * (i + 1), render=5)
                for i in range(4)]
    history += [_entry(200, "hash", 0, total=1, metadata=1, custom=3)]
    rows = prof.stage_stats(history)
    by = {(r["kind"], r["measure"], r["stage"]): r for r in rows}
    cand = by[(prof.LAKE_IMAGES, "color", "candidates")]
    assert cand["count"] == 100 and cand["p50"] == pytest.approx(50.5) and cand["p95"] == pytest.approx(95.05)
    assert cand["mean"] == pytest.approx(50.5) and cand["max"] == 100
    dec = by[(prof.UPLOADS, "embedding", "decode")]  # uploads are kept apart from lake images
    assert dec["count"] == 4 and dec["p50"] == pytest.approx(5.0) and dec["p95"] == pytest.approx(7.7)
    assert by[(prof.UPLOADS, "embedding", "render")]["count"] == 4
    assert (prof.LAKE_IMAGES, "color", "render") not in by  # a stage a search did not have is not counted
    # order: lake images first, measures as in MEASURE_ORDER, stages in pipeline order (unknown ones before total)
    assert [(r["kind"], r["measure"]) for r in rows] == sorted(
        [(r["kind"], r["measure"]) for r in rows],
        key=lambda km: (km[0] != prof.LAKE_IMAGES, prof.MEASURE_ORDER.index(km[1])))
    color_stages = [r["stage"] for r in rows if r["measure"] == "color"]
    assert color_stages == ["setup", "decode", "candidates", "total"]
    assert [r["stage"] for r in rows if r["measure"] == "hash"] == ["metadata", "custom", "total"]
    assert prof.stage_stats([]) == []


def test_query_stage_rows_leave_out_total() -> None:
    history = [_entry(i, "mix", i % 2, setup=1, decode=2, total=3) for i in range(40)]
    rows = prof.query_stage_rows(history, last=10)
    assert {r["query_id"] for r in rows} == set(range(30, 40))
    assert {r["stage"] for r in rows} == {"setup", "decode"}
    assert {r["kind"] for r in rows} == {prof.UPLOADS, prof.LAKE_IMAGES}


def test_sample_searches_fill_the_history(engine: object) -> None:
    done = prof.sample_searches(engine, per_measure=2, uploads=1, seed=3)  # type: ignore[arg-type]
    assert len(done) == 3 * len(prof.MEASURE_ORDER)
    rows = prof.stage_stats(engine.history())  # type: ignore[attr-defined]
    totals = {(r["kind"], r["measure"]): r["count"] for r in rows if r["stage"] == "total"}
    for m in prof.MEASURE_ORDER:
        assert totals[(prof.LAKE_IMAGES, m)] >= 2 and totals[(prof.UPLOADS, m)] >= 1
    up = {r["stage"]: r for r in rows if r["kind"] == prof.UPLOADS and r["measure"] == "embedding"}
    assert up["decode"]["p50"] > 0 and up["features"]["p50"] > 0


# --- ingestion runs -----------------------------------------------------------------------------------------------


def test_ingest_runs_from_a_real_ingest(engine: object) -> None:
    (run,) = prof.ingest_runs(engine)
    assert run["images"] == 12 and run["scanned"] == 12 and run["workers"] == 1 and run["device"] == "cpu"
    assert run["seconds"] > 0 and run["images_per_s"] == pytest.approx(12 / run["seconds"], rel=0.05)
    # the last batch's embedding and write and the compaction are in the run's row; only the index build is not
    assert {"scan", "read", "decode", "color", "hash", "model_load", "embed", "write", "compact"} <= set(run["stages"])
    assert list(run["stages"]) == prof.sort_ingest_stages(run["stages"])
    assert run["ms_per_image"]["decode"] == pytest.approx(run["stages"]["decode"] * 1000 / 12, abs=1e-3)
    assert sum(run["share"].values()) == pytest.approx(1.0, abs=1e-3)
    rows = prof.ingest_stage_rows([run])
    assert {r["stage"] for r in rows} == set(run["stages"]) and all(r["run_id"] == run["run_id"] for r in rows)
    # the same from a LakeConnection, and the limit
    conn = engine.lake.connect()  # type: ignore[attr-defined]
    try:
        assert prof.ingest_runs(conn)[0]["run_id"] == run["run_id"]
        assert prof.ingest_runs(conn, limit=0) == []
    finally:
        conn.close()


# --- cold start ---------------------------------------------------------------------------------------------------


def test_cold_start_in_a_fresh_process(lake: Path) -> None:
    out = prof.cold_start(lake, "mix")
    parts = out["parts_ms"]
    assert list(parts) == [p for p in prof.COLD_PARTS if p in parts]
    assert {"interpreter", "imports", "index_open", "duckdb", "model_load", "first_search"} <= set(parts)
    assert all(v >= 0 for v in parts.values()) and parts["imports"] > 0 and parts["model_load"] > 0
    assert out["needs_model"] and "copy of" in out["query"]  # a new photo: decoded and embedded
    assert sum(v for p, v in parts.items() if p != "other") <= out["total_ms"] + 0.5
    assert out["total_ms"] == pytest.approx(sum(parts.values()), abs=1.0)
    assert out["process_ms"] >= out["total_ms"] >= out["child_ms"]
    details = out["details_ms"]
    assert set(details["imports"]) == set(prof.COLD_IMPORTS)
    assert set(details["model_load"]) == {"onnx_import", "weights"}  # ONNX Runtime: no torch in the process
    assert out["backend"] == "onnx" and out["torch_imported"] is False
    assert details["first_search"]["decode"] > 0 and details["first_search"]["features"] > 0
    assert out["results"] == 5 and out["first_result"]["score"] == pytest.approx(1.0, abs=1e-3)  # finds itself

    by_id = prof.cold_start(lake, "color", query=0)  # stored features: no model
    assert not by_id["needs_model"] and "model_load" not in by_id["parts_ms"]
    assert by_id["details_ms"]["first_search"]["decode"] == 0 and by_id["results"] == 5


def test_cold_start_errors(tmp_path: Path, lake: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no lake"):
        prof.cold_start(tmp_path / "nothing")
    with pytest.raises(prof.ColdStartError, match="not in the lake"):
        prof.cold_start(lake, "hash", query=10_000)


# --- a profiled search --------------------------------------------------------------------------------------------


def test_profile_search_lists_top_functions(engine: object, lake: Path) -> None:
    photo = next((lake.parent / "pictures").rglob("*.png")).read_bytes()
    out = prof.profile_search(engine, [photo], "mix", k=5, repeat=3, html=True)  # type: ignore[arg-type]
    assert len(out["response"].results) == 5 and out["samples"] > 0 and out["duration_ms"] > 0
    for key in ("top_self", "top_cumulative"):
        rows = out[key]
        assert rows and all(set(r) == {"function", "location", "ms", "share", "app"} for r in rows)
        assert [r["ms"] for r in rows] == sorted((r["ms" ] for r in rows), reverse=True)
        assert all(0 < r["share"] <= 1.0 + 1e-6 for r in rows)
    cum = out["top_cumulative"]
    assert any(r["function"] == "Engine.search" and r["location"].startswith("imgrec/search.py:") for r in cum)
    assert cum[0]["share"] > 0.5 and not any("profiling.py" in r["location"] for r in cum)
    assert "search" in out["text"] and out["html"].lstrip().lower().startswith("<!doctype html")


# --- the page -----------------------------------------------------------------------------------------------------


def _page(monkeypatch: pytest.MonkeyPatch, lake: Path) -> AppTest:
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    return at.switch_page(PAGE).run()


def _charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def _button(at: AppTest, label: str):  # type: ignore[no-untyped-def]
    return next(b for b in at.button if b.label == label)


def test_page_on_a_missing_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-lake-here"
    at = _page(monkeypatch, missing)
    assert not at.exception and not at.error
    assert at.title[0].value == "Profiling"
    assert any(f"imgrec ingest FOLDER --lake {missing}" in i.value for i in at.info)
    assert not at.button and not _charts(at)
    assert not missing.exists()


def test_page_on_a_filled_lake(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrec import ui

    ui.open_engine.clear()  # a fresh engine: no search history yet
    at = _page(monkeypatch, lake)
    assert not at.exception and not at.error
    assert any("No searches yet" in i.value for i in at.info)
    assert any(h.value == "Ingestion" for h in at.header)
    assert any(h.value == "Benchmarks" for h in at.header)  # the committed reports of docs/bench
    targets = next(d for d in at.dataframe if "status" in d.value.columns).value
    assert "index build" in set(targets["figure"]) and set(targets["status"]) <= {"pass", "FAIL", "n/a"}
    before = _charts(at)  # the cold start of this process and the ingestion charts
    assert before >= 2

    _button(at, "Run sample searches").click().run()
    assert not at.exception and not at.error
    assert not any("No searches yet" in i.value for i in at.info)
    assert _charts(at) >= before + 3  # p50/p95 for lake images and uploads, and the last searches
    stats = next(d for d in at.dataframe if "p95" in d.value.columns)
    assert {"lake images", "uploads"} == set(stats.value["kind"]) and set(stats.value["measure"]) == set(
        prof.MEASURE_ORDER)
    assert any(m.label == "mix · lake images" for m in at.metric)

    at.selectbox(key="prof_cold_measure").set_value("color")  # no model: quick
    _button(at, "Measure a cold start").click().run()
    assert not at.exception and not at.error
    assert any(m.label == "New process → first result" for m in at.metric)
    parts = next(d for d in at.dataframe if "a fresh process (measured)" in d.value.columns).value
    fresh = parts.dropna(subset=["a fresh process (measured)"])
    assert {"imports", "index_open", "duckdb", "first_search"} <= set(fresh["part"])
    assert "model_load" not in set(fresh["part"])  # colour needs no model

    at.selectbox(key="prof_measure").set_value("embedding")
    _button(at, "Profile one query").click().run()
    assert not at.exception and not at.error
    md = [m.value for m in at.markdown]
    assert "**Top functions by self time**" in md and "**Top functions by cumulative time**" in md
    tops = [d.value for d in at.dataframe if "location" in d.value.columns]
    assert len(tops) == 2 and all(len(t) > 0 for t in tops)
    assert any("imgrec/search.py" in loc for loc in tops[1]["location"])
    assert any("samples" in m for m in md)

    # an upload without a file is a clear error, not a traceback
    at.radio(key="prof_source").set_value(at.radio(key="prof_source").options[2])
    at.run()
    _button(at, "Profile one query").click().run()
    assert not at.exception and any("upload an image first" in e.value for e in at.error)


def test_bench_reports_are_listed_newest_first(tmp_path: Path) -> None:
    from imgrec.bench import report as bench

    for name, started in (("old", "2026-01-01T10:00"), ("new", "2026-02-01T10:00")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"mode": "quick", "machine": {"cpus": 2},
                                                           "started_at": started}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"something": "else"}))
    assert [p.stem for p, _ in bench.list_reports(tmp_path)] == ["new", "old"]
    assert bench.list_reports(tmp_path / "absent") == []
