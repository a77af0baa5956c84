"""Join: two sets of images of the lake matched by similarity. For every image of the left side its k best on the
right (kNN), or every pair scoring at least a threshold (range); the pairs as thumbnail pairs with their scores,
sorted, paged, filtered by score, exported; for a range self-join, the connected groups. The join runs in the
background (`imgrec join`), with its progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from imgrec import jobs, ui
from imgrec.measures import MEASURES

PER_PAGE = 12
JOB_KEY = "join_params"  # the parameters of the join this session started or opened


def _sides(status: ui.LakeStatus) -> list[str]:
    from imgrec import browse

    rows = browse.folders(status.engine)
    collections = sorted({r["collection"] for r in rows})
    folders = sorted({f"{r['collection']}/{r['folder']}" for r in rows if r["folder"]})
    return ["all", *collections, *folders]


@st.cache_data(show_spinner=False, max_entries=8)
def _pairs(path: str, mtime: float) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _chosen() -> dict[str, Any]:
    """The form's values as they stand (read in the button's callback: the arguments bound when the button was
    drawn would be those of the run before the last change)."""
    ss = st.session_state
    knn = ss.get("join_mode", "kNN") == "kNN"
    return {"left": ss["join_left"], "right": ss["join_right"], "measure": ss["join_measure"],
            "k": int(ss.get("join_k", 3)) if knn else None,
            "threshold": None if knn else float(ss.get("join_threshold", 0.9))}


def _start(lake: str) -> None:
    from imgrec import access

    st.session_state.pop("join_error", None)
    params = _chosen()
    try:
        ui.require_admin("join")
        jobs.start_join(lake, params["left"], params["right"], params["measure"], k=params["k"],
                        threshold=params["threshold"])
        st.session_state[JOB_KEY] = params
    except (jobs.JobError, access.Forbidden) as exc:
        st.session_state["join_error"] = str(exc)


def _form(status: ui.LakeStatus) -> None:
    sides = _sides(status)
    c1, c2, c3 = st.columns([3, 3, 2])
    c1.selectbox("Left", sides, key="join_left", help="for every image of this side...")
    c2.selectbox("Right", sides, key="join_right",
                         help="...its best matches on this side (the same side: a self-join, each pair once)")
    measure = c3.selectbox("Measure", MEASURES, index=MEASURES.index("mix"), key="join_measure",
                           help="  \n".join(f"**{m}**: {t}" for m, t in ui.MEASURE_HELP.items()))
    c4, c5 = st.columns([2, 5], vertical_alignment="bottom")
    mode = c4.radio("Join", ["kNN", "Range"], horizontal=True, key="join_mode",
                    help="kNN: the k best on the right for every image on the left. Range: every pair scoring at "
                         "least the threshold (0.875 under hash: within 16 of 128 bits; the search's near-duplicates are within 24)")
    if mode == "kNN":
        c5.slider("k", 1, 20, 3, key="join_k")
    else:
        c5.slider("Score at least", 0.0, 1.0, 0.875 if measure == "hash" else 0.9, 0.005, key="join_threshold")


def _progress(lake: str) -> None:
    job = jobs.current(lake, "join")
    if job is None:
        return
    running = job.running

    @st.fragment(run_every=1.0 if running else None)
    def show() -> None:
        state = job.state()
        if state.running:
            st.progress(state.fraction, text=f"Joining {state.folder}: {state.done:,} of {state.total or 0:,} images "
                                             f"({state.images_per_s:,.0f} images/s)")
            st.button("Stop", key="join_stop", on_click=jobs.stop, args=(lake, "join"), icon=":material/stop:")
            return
        if running:
            st.rerun()
        if state.status == "failed":
            st.error(f"The join failed: {state.error}")
        elif state.status == "stopped":
            st.warning("The join was stopped; the pairs found so far are below.")

    show()


def _pair_rows(status: ui.LakeStatus, table: Any, params: dict[str, Any]) -> None:
    import pyarrow.compute as pc

    lo = st.slider("Pairs scoring at least", 0.0, 1.0, 0.0, 0.01, key="join_min_score")
    order = st.radio("Order", ["best first", "by left image"], horizontal=True, key="join_order")
    view = table.filter(pc.greater_equal(table["score"], lo))
    view = view.sort_by([("score", "descending")] if order == "best first" else
                        [("left_id", "ascending"), ("rank", "ascending")])
    n = view.num_rows
    st.caption(f"{n:,} of {table.num_rows:,} pairs · {params['measure']} · "
               f"{'k = ' + str(params['k']) if params['k'] else 'score >= ' + str(params['threshold'])}")
    if n == 0:
        st.info("No pair at this score: lower the filter, or run a join with a lower threshold.")
        return
    pages = (n + PER_PAGE - 1) // PER_PAGE
    page = st.number_input("Page", 1, pages, 1, key="join_page") - 1 if pages > 1 else 0
    shown = view.slice(page * PER_PAGE, PER_PAGE).to_pylist()
    thumbs = status.engine.thumbnails([p["left_id"] for p in shown] + [p["right_id"] for p in shown])
    cols = st.columns(3)
    for i, p in enumerate(shown):
        with cols[i % 3], st.container(border=True):
            a, b = st.columns(2)
            for col, side in ((a, "left"), (b, "right")):
                if p[f"{side}_id"] in thumbs:
                    col.image(thumbs[p[f"{side}_id"]], width="stretch")
                col.caption(Path(p[f"{side}_path"] or "").name or f"#{p[f'{side}_id']}")
            st.markdown(f"**{p['score']:.3f}** · rank {p['rank']}")
            st.caption(f"embedding {p['score_embedding']:.3f} · colour {p['score_color']:.3f} · "
                       f"hash {p['score_hash']:.3f}")
    if pages > 1:
        st.caption(f"page {page + 1} of {pages}")


def _export(table: Any) -> None:
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv, parquet = io.BytesIO(), io.BytesIO()
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet, compression="zstd")
    c1, c2 = st.columns(2)
    c1.download_button("Export the pairs (CSV)", csv.getvalue(), "pairs.csv", "text/csv", icon=":material/download:")
    c2.download_button("Export the pairs (Parquet)", parquet.getvalue(), "pairs.parquet",
                       "application/octet-stream", icon=":material/download:")


def _groups(status: ui.LakeStatus, table: Any) -> None:
    from imgrec.join import groups

    found = groups(table["left_id"].to_numpy(), table["right_id"].to_numpy())
    st.subheader(f"Groups ({len(found):,})")
    st.caption("The pairs' connected groups: images linked by pairs over the threshold, largest first.")
    for g in found[:20]:
        members = g[:8]
        thumbs = status.engine.thumbnails(members)
        with st.container(border=True):
            st.markdown(f"**{len(g)} images**")
            cols = st.columns(8)
            for col, image_id in zip(cols, members, strict=False):
                if image_id in thumbs:
                    col.image(thumbs[image_id], width="stretch", caption=f"#{image_id}")


status = ui.page_start("Join", ":material/join_inner:")
lake = str(status.path)
_form(status)
st.button("Run the join", type="primary", icon=":material/join_inner:", on_click=_start, args=(lake,),
          disabled=not ui.is_admin(), help=None if ui.is_admin() else "only an admin can run a join on this server")
if st.session_state.get("join_error"):
    st.error(f"Cannot start: {st.session_state['join_error']}")
_progress(lake)

shown = st.session_state.get(JOB_KEY)
if shown is not None:
    job = jobs.current(lake, "join")
    out = jobs.join_output(lake, shown["left"], shown["right"], shown["measure"], shown["k"], shown["threshold"])
    if (job is None or not job.running) and out.is_file():
        table = _pairs(str(out), out.stat().st_mtime)
        st.divider()
        st.subheader(f"{shown['left']} ~ {shown['right']}")
        _export(table)
        _pair_rows(status, table, shown)
        if shown["threshold"] is not None and shown["left"] == shown["right"]:
            _groups(status, table)
