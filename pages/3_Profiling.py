"""Profiling: where the time goes -- search stages (p50 / p95 per stage and measure), cold start, ingestion
throughput, and a sampling profile (pyinstrument) of one query. Numbers from ``imgrec.profiling``."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import streamlit as st

from imgrec import profiling as prof
from imgrec import ui
from imgrec.measures import MEASURES

log = logging.getLogger("imgrec.app")

LAST_QUERIES = 30  # searches in the strip of stacked stage times
COLD_KEY = "prof_cold_start"  # the last cold-start measurement (lake, result)
PROFILE_KEY = "prof_profile"  # the last profiled query (lake, result)
SOURCES = ("An image of the lake (stored features)", "An image of the lake as a new photo (decoded + embedded)",
           "An upload")


def _chart(chart: Any) -> None:
    st.altair_chart(chart, width="stretch")


def _fail(what: str, exc: Exception) -> None:
    from imgrec.lake import LakeError
    from imgrec.search import QueryError

    if isinstance(exc, QueryError | LakeError | FileNotFoundError | ValueError | prof.ColdStartError):
        st.error(f"{what}: {exc}")
    else:  # a bug: say so in words, keep the details in the server's log
        log.exception(what)
        st.error(f"{what} failed unexpectedly ({type(exc).__name__}: {exc}). Details are in the server log.")


# --- (a) recent searches ----------------------------------------------------------------------------------------------


def _percentile_charts(stats: list[dict[str, Any]]) -> None:
    """Per query kind: p50 (bars) and p95 (ticks) per stage, one bar per measure."""
    import altair as alt

    for kind in (prof.LAKE_IMAGES, prof.UPLOADS):
        rows = [r for r in stats if r["kind"] == kind and r["stage"] != "total"]
        if not rows:
            continue
        stages = prof.sort_stages(r["stage"] for r in rows)
        measures = [m for m in prof.MEASURE_ORDER if any(r["measure"] == m for r in rows)]
        base = alt.Chart().encode(
            x=alt.X("stage:N", sort=stages, title=None, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("measure:N", sort=measures),
            color=alt.Color("measure:N", sort=measures, title="measure"),
            tooltip=["measure:N", "stage:N", "count:Q", alt.Tooltip("p50:Q", format=".2f"),
                     alt.Tooltip("p95:Q", format=".2f"), alt.Tooltip("mean:Q", format=".2f")],
        )
        bars = base.mark_bar().encode(y=alt.Y("p50:Q", title="ms (bar: p50, tick: p95)"))
        ticks = base.mark_tick(thickness=2, size=10, color="#333").encode(y="p95:Q")
        n = sum(r["count"] for r in stats if r["kind"] == kind and r["stage"] == "total")
        what = "decoded and embedded" if kind == prof.UPLOADS else "stored features"
        st.markdown(f"**{kind}** ({what}; {n} searches)")
        _chart(alt.layer(bars, ticks, data=alt.Data(values=rows)).properties(height=260))


def _last_queries_chart(history: list[dict[str, Any]]) -> None:
    import altair as alt

    rows = prof.query_stage_rows(history, LAST_QUERIES)
    if not rows:
        return
    order = list(dict.fromkeys(r["query"] for r in reversed(rows)))  # newest on top
    stages = prof.sort_stages({r["stage"] for r in rows})
    chart = alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        y=alt.Y("query:N", sort=order, title=None, axis=alt.Axis(labelLimit=240)),
        x=alt.X("sum(ms):Q", title="ms"),
        color=alt.Color("stage:N", sort=stages, title="stage"),
        order=alt.Order("order:Q"),
        tooltip=["query:N", "stage:N", alt.Tooltip("ms:Q", format=".2f")],
    ).properties(height=alt.Step(22))
    _chart(chart)


def _run_samples(status: ui.LakeStatus) -> None:
    try:
        with st.spinner("Searching with random images of the lake, for every measure…"):
            done = prof.sample_searches(status.engine, per_measure=4, uploads=1, seed=random.randrange(1_000_000))
        st.toast(f"{len(done)} sample searches done")
    except Exception as exc:
        _fail("The sample searches", exc)


def searches_section(status: ui.LakeStatus) -> None:
    st.header("Searches")
    st.caption("The searches this server process answered (every session, this lake), split by what the query "
               "images cost: **uploads** are decoded and embedded, **lake images** use stored features.")
    clicked = st.button("Run sample searches", icon=":material/play_arrow:",
                        help="a few searches per measure with random images of the lake (by id, and one as a new "
                             "photo), so that the charts fill")
    if clicked:
        _run_samples(status)
    history = status.engine.history()
    if not history:
        st.info("No searches yet in this server process. Search on the Search page, or run sample searches.")
        return
    stats = prof.stage_stats(history)
    totals = {(r["kind"], r["measure"]): r for r in stats if r["stage"] == "total"}
    cols = st.columns(min(4, max(1, len(totals))))
    for j, ((kind, measure), r) in enumerate(totals.items()):
        cols[j % len(cols)].metric(f"{measure} · {kind}", f"{r['p50']:.1f} ms",
                                   help=f"total p50; p95 {r['p95']:.1f} ms over {r['count']} searches")
    st.subheader("p50 / p95 per stage and measure")
    _percentile_charts(stats)
    with st.expander("The numbers (ms)", expanded=False):
        st.dataframe(stats, hide_index=True, width="stretch")
    st.subheader(f"The last {min(LAST_QUERIES, len(history))} searches")
    _last_queries_chart(history)


# --- (b) cold start ---------------------------------------------------------------------------------------------------


def _cold_rows(status: ui.LakeStatus, cold: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    if cold is not None:
        rows += [{"process": "a fresh process (measured)", "part": p, "ms": float(ms)}
                 for p, ms in cold["parts_ms"].items()]
    rows += [{"process": "this server process", "part": p, "ms": float(ms)} for p, ms in status.engine.startup_ms.items()]
    for r in rows:
        r["order"] = prof.COLD_PARTS.index(r["part"]) if r["part"] in prof.COLD_PARTS else len(prof.COLD_PARTS)
    return rows


def cold_start_section(status: ui.LakeStatus) -> None:
    import altair as alt

    st.header("Cold start")
    st.caption("A new process until its first result: interpreter start, imports, index open, DuckDB (only where "
               "the search needs it), model load (ONNX Runtime, or torch, import + the model; only when the query "
               "must be embedded), first search. This server's own engine opened the lake once (its model loads "
               "in the background).")
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    measure = c1.selectbox("Measure", MEASURES, index=MEASURES.index("mix"), key="prof_cold_measure")
    if c2.button("Measure a cold start", icon=":material/timer:",
                 help="starts a fresh Python process that opens the lake and searches with a copy of one of its "
                      "images (decoded and embedded like a new photo); a few seconds"):
        try:
            with st.spinner("Starting a fresh process and searching…"):
                st.session_state[COLD_KEY] = (str(status.path), prof.cold_start(status.path, measure))
        except Exception as exc:
            _fail("The cold-start measurement", exc)
    saved = st.session_state.get(COLD_KEY)
    cold = saved[1] if saved is not None and saved[0] == str(status.path) else None
    if cold is not None:
        st.metric("New process → first result", f"{cold['total_ms']:,.0f} ms",
                  help=f"{cold['measure']}; query: {cold['query']}; the process exited after "
                       f"{cold['process_ms']:,.0f} ms")
    rows = _cold_rows(status, cold)
    if rows:
        parts = [p for p in prof.COLD_PARTS if any(r["part"] == p for r in rows)]
        parts += sorted({r["part"] for r in rows} - set(parts))
        chart = alt.Chart(alt.Data(values=rows)).mark_bar().encode(
            y=alt.Y("process:N", title=None, axis=alt.Axis(labelLimit=240)),
            x=alt.X("sum(ms):Q", title="ms"),
            color=alt.Color("part:N", sort=parts, title=None, legend=alt.Legend(orient="bottom", columns=4)),
            order=alt.Order("order:Q"),
            tooltip=["process:N", "part:N", alt.Tooltip("ms:Q", format=",.1f")],
        ).properties(height=alt.Step(32))
        _chart(chart)
        table: dict[str, dict[str, Any]] = {}
        for r in rows:
            table.setdefault(r["part"], {"part": r["part"]})[r["process"]] = round(r["ms"], 1)
        st.dataframe([table[p] for p in parts], hide_index=True, width="stretch")
    if cold is not None:
        first = cold.get("first_result") or {}
        st.caption(f"Query: {cold['query']} · {cold['results']} results, the first #{first.get('image_id')} "
                   f"{first.get('relpath', '')} ({first.get('score')}) · {cold['cpus']} CPUs · "
                   f"device {cold.get('device') or 'none needed'}")
        with st.expander("Details (ms): each import, the model, the first search's stages", expanded=False):
            st.json(cold["details_ms"])


# --- (c) ingestion ----------------------------------------------------------------------------------------------------


def ingestion_section(status: ui.LakeStatus) -> None:
    import altair as alt

    st.header("Ingestion")
    try:
        runs = prof.ingest_runs(status.engine, limit=20)
    except Exception as exc:
        _fail("Reading the ingestion runs", exc)
        return
    if not runs:
        st.info("No ingestion run is recorded in this lake.")
        return
    st.caption("The last runs recorded in the lake's `runs` table. Worker stages (read, decode, colour, hash, "
               "thumbnail, preprocess) are summed over the workers, so per image they are CPU time, not wall time.")
    labels = [f"{str(r['started_at'])[:19]} · {r['run_id'][:6]}" for r in runs]
    tput = [{"run": lab, "images/s": r["images_per_s"], "images": r["images"], "seconds": r["seconds"],
             "workers": r["workers"], "device": r["device"]} for lab, r in zip(labels, runs, strict=True)]
    height = alt.Step(26)
    st.markdown("**Throughput** (ingested images per second of the run)")
    _chart(alt.Chart(alt.Data(values=tput)).mark_bar().encode(
        y=alt.Y("run:N", sort=list(reversed(labels)), title=None, axis=alt.Axis(labelLimit=240)),
        x=alt.X("images/s:Q"), tooltip=["run:N", "images/s:Q", "images:Q", "seconds:Q", "workers:Q", "device:N"],
    ).properties(height=height))
    st.markdown("**Per stage** (ms per ingested image)")
    rows = [r for r in prof.ingest_stage_rows(runs) if r["ms_per_image"] is not None]
    stages = prof.sort_ingest_stages(r["stage"] for r in rows)
    _chart(alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        y=alt.Y("run:N", sort=list(reversed(labels)), title=None, axis=alt.Axis(labelLimit=240)),
        x=alt.X("sum(ms_per_image):Q", title="ms per image"),
        color=alt.Color("stage:N", sort=stages, title=None, legend=alt.Legend(orient="bottom", columns=6)),
        order=alt.Order("order:Q"),
        tooltip=["run:N", "stage:N", alt.Tooltip("ms_per_image:Q", format=".2f"),
                 alt.Tooltip("seconds:Q", format=".2f"), alt.Tooltip("share:Q", format=".1%")],
    ).properties(height=height))
    table = [{"run": lab, "images": r["images"], "seconds": r["seconds"], "images/s": r["images_per_s"],
              "workers": r["workers"], "device": r["device"], "interrupted": r["interrupted"],
              **{f"{s} s": v for s, v in r["stages"].items()}} for lab, r in zip(labels, runs, strict=True)]
    with st.expander("The numbers", expanded=False):
        st.dataframe(list(reversed(table)), hide_index=True, width="stretch")


def bench_section() -> None:
    from imgrec.bench import report as bench

    st.header("Benchmarks")
    reports = bench.list_reports()
    if not reports:
        st.info(f"No benchmark report in {bench.reports_dir()}: run `imgrec bench --quick` (a few minutes) or "
                "`imgrec bench --sizes 400k` to make one.")
        return
    st.caption("Reports of `imgrec bench` (synthetic collections made from real features, the same stage timings "
               "as above, exact brute force beside each figure), judged against the targets at 400,000 images. "
               "`docs/performance.md` discusses them.")
    names = [f"{p.stem} · {str(r.get('started_at', '?'))[:16]} · load {r['machine'].get('load_start', '?')}"
             for p, r in reports]
    pick = st.selectbox("Report", range(len(reports)), format_func=names.__getitem__, key="prof_bench")
    path, report = reports[pick]
    m = report["machine"]
    st.markdown(f"{m.get('cpus')} CPU cores ({m.get('cpu', '?')}), {m.get('memory_gb', '?')} GB, "
                f"{m.get('accelerator', 'no GPU')} · commit {m.get('commit', '?')} · {report.get('seconds', '?')} s")
    targets = report.get("targets") or bench.evaluate_targets(report)
    st.dataframe([{"figure": t["figure"], "measured": t["value"], "target": f"{t['op']} {t['target']:g} {t['unit']}",
                   "N": t["n"], "status": t["status"], "note": t["where"]} for t in targets],
                 hide_index=True, width="stretch")
    with st.expander(f"The whole report ({path.name})", expanded=False):
        st.markdown(bench.markdown(report))


# --- (d) one query under the profiler ---------------------------------------------------------------------------------


def _profile_query(status: ui.LakeStatus, source: str, upload: Any) -> tuple[list[int | bytes], str]:
    """The query (an id or image bytes: plain values, which survive a reload of imgrec.search) and its name."""
    from imgrec.search import QueryError

    if source == SOURCES[2]:
        if upload is None:
            raise QueryError("upload an image first")
        return [upload.getvalue()], f"{upload.name} (upload)"
    (row,) = status.engine.sample(1, seed=random.randrange(1_000_000))
    name = f"#{row['image_id']} {row.get('relpath') or row['path']}"
    if source == SOURCES[0]:
        return [int(row["image_id"])], f"{name} (stored features)"
    try:
        return [Path(row["path"]).read_bytes()], f"{name} (as a new photo)"
    except OSError as exc:
        raise QueryError(f"cannot read {row['path']}: {exc.strerror or exc}") from None


def _top_table(rows: list[dict[str, Any]]) -> None:
    shown = [{"function": r["function"], "location": r["location"], "ms": r["ms"], "share %": 100.0 * r["share"],
              "imgrec": r["app"]} for r in rows]
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        "share %": st.column_config.ProgressColumn("share", format="%.1f %%", min_value=0.0, max_value=100.0),
        "imgrec": st.column_config.CheckboxColumn("app code", help="not a library (numpy, DuckDB, torch, …)"),
    })


def profile_section(status: ui.LakeStatus) -> None:
    st.header("Profile one query")
    st.caption("Runs one search under a sampling profiler (pyinstrument, every 0.5 ms) and lists the functions it "
               "spent its time in. The search is real: it also appears in the charts above.")
    c1, c2, c3 = st.columns([1, 3, 1], vertical_alignment="bottom")
    measure = c1.selectbox("Measure", MEASURES, index=MEASURES.index("mix"), key="prof_measure")
    source = c2.radio("Query image", SOURCES, key="prof_source")
    repeat = c3.number_input("Repeat", 1, 50, 1, key="prof_repeat",
                             help="run the same search this many times under the profiler (more samples)")
    upload = None
    if source == SOURCES[2]:
        upload = st.file_uploader("Query image", type=list(ui.UPLOAD_TYPES), key="prof_upload")
    if st.button("Profile one query", type="primary", icon=":material/speed:"):
        try:
            queries, name = _profile_query(status, source, upload)
            with st.spinner("Profiling…"):
                result = prof.profile_search(status.engine, queries, measure, k=10, repeat=int(repeat), html=True,
                                             exclude_query=True)
            result["query"] = name
            result.pop("response", None)
            st.session_state[PROFILE_KEY] = (str(status.path), result)
        except Exception as exc:
            _fail("Profiling the query", exc)
    saved = st.session_state.get(PROFILE_KEY)
    if saved is None or saved[0] != str(status.path):
        return
    result = saved[1]
    st.markdown(f"**{result['query']}** · {result['measure']} · {result['repeat']} search(es) in "
                f"{result['duration_ms']:.1f} ms · {result['samples']} samples")
    st.markdown("**Top functions by self time**")
    _top_table(result["top_self"])
    st.markdown("**Top functions by cumulative time**")
    _top_table(result["top_cumulative"])
    with st.expander("pyinstrument's call tree", expanded=False):
        st.code(result["text"], language=None)
    if result.get("html"):
        st.download_button("Download the interactive profile (HTML)", result["html"], file_name="imgrec-profile.html",
                           mime="text/html", icon=":material/download:")


# --- the page ---------------------------------------------------------------------------------------------------------


status = ui.page_start("Profiling", ":material/speed:")

searches_section(status)
st.divider()
cold_start_section(status)
st.divider()
ingestion_section(status)
st.divider()
profile_section(status)
st.divider()
bench_section()
