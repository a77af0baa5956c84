"""Search: 1 to 5 query images (uploaded, or picked from a sample of the lake) -> the most similar images."""

from __future__ import annotations

import logging
import random
from typing import Any

import streamlit as st

from imgrec import ui
from imgrec.config import MEASURES

log = logging.getLogger("imgrec.app")

SAMPLE_SIZE = 48
GRID_COLUMNS = 5
RESULT_KEY = "search_result"  # the last search: survives reruns, so "more like this" and widgets keep it visible
MORE_KEY = "search_more_like"  # image id whose "more like this" button was clicked (set by the button's callback)


def _more_like(image_id: int) -> None:
    st.session_state[MORE_KEY] = image_id


def _new_sample() -> None:
    st.session_state["sample_seed"] = random.randrange(1_000_000)


def _sample(status: ui.LakeStatus) -> list[dict[str, Any]]:
    """A random sample of the lake with thumbnails, computed once per lake, snapshot and seed."""
    seed = st.session_state.setdefault("sample_seed", random.randrange(1_000_000))
    key = (str(status.path), status.snapshot, seed)
    cached = st.session_state.get("sample")
    if cached is None or cached[0] != key:
        if cached is not None and cached[0][0] != key[0]:  # another lake: its ids mean other images
            st.session_state["pick_names"] = {}
            st.session_state["picked"] = []
        engine = status.engine
        rows = engine.sample(SAMPLE_SIZE, seed=seed)
        thumbs = engine.thumbnails([r["image_id"] for r in rows])
        for r in rows:
            r["thumb"] = thumbs.get(r["image_id"])
        cached = (key, rows)
        st.session_state["sample"] = cached
        names = st.session_state.setdefault("pick_names", {})
        names.update({r["image_id"]: _name(r) for r in rows})
    return cached[1]


def _name(row: dict[str, Any]) -> str:
    label = f" ({row['label']})" if row.get("label") else ""
    return f"#{row['image_id']} · {row.get('relpath') or row.get('path')}{label}"


def _previews(status: ui.LakeStatus, files: list[Any], picked: list[int], rows: list[dict[str, Any]]
              ) -> list[tuple[str, bytes | None]]:
    """(caption, thumbnail) of each query image; an upload that cannot be decoded has no thumbnail."""
    cached: dict[str, bytes | None] = st.session_state.get("upload_thumbs", {})
    current = {}
    out: list[tuple[str, bytes | None]] = []
    for f in files:
        fid = getattr(f, "file_id", None) or f"{f.name}:{f.size}"
        current[fid] = cached[fid] if fid in cached else ui.query_thumbnail(f.getvalue())
        out.append((f.name if current[fid] else f"{f.name} (cannot be read)", current[fid]))
    st.session_state["upload_thumbs"] = current  # only the files still uploaded
    thumbs = {r["image_id"]: r.get("thumb") for r in rows}
    missing = [i for i in picked if thumbs.get(i) is None]
    if missing:
        thumbs.update(status.engine.thumbnails(missing))
    names = st.session_state.get("pick_names", {})
    return out + [(names.get(i, f"#{i}"), thumbs.get(i)) for i in picked]


def _show_queries(previews: list[tuple[str, bytes | None]]) -> None:
    cols = st.columns(8)
    for col, (name, thumb) in zip(cols, previews, strict=False):
        with col:
            if thumb:
                st.image(thumb, width="stretch")
            st.caption(name)


def _search(status: ui.LakeStatus, uploads: list[tuple[str, bytes]], picked: list[int], measure: str, k: int,
            exclude_query: bool, title: str, previews: list[tuple[str, bytes | None]]) -> None:
    """Run one search and keep its outcome in the session (errors as st.error, never a traceback)."""
    from imgrec.lake import LakeError
    from imgrec.search import QueryError

    st.session_state.pop(RESULT_KEY, None)
    try:
        with st.spinner("Searching…"):
            resp = ui.run_search(status.engine, uploads, picked, measure, k, exclude_query=exclude_query)
            thumbs = status.engine.thumbnails([r.image_id for r in resp.results])
    except (QueryError, LakeError) as exc:
        st.error(f"Cannot search: {exc}")
        return
    except Exception as exc:  # a bug: say so in words, keep the details in the server's log
        log.exception("search failed")
        st.error(f"The search failed unexpectedly ({type(exc).__name__}: {exc}). Details are in the server log.")
        return
    names = st.session_state.setdefault("pick_names", {})
    for r in resp.results:  # so that "more like this" can name its query
        names.setdefault(r.image_id, _name({"image_id": r.image_id, "relpath": r.relpath, "path": r.path,
                                            "label": r.label}))
    st.session_state[RESULT_KEY] = {"lake": str(status.path), "title": title, "response": resp,
                                    "thumbs": thumbs, "queries": previews}


def _show_result(state: dict[str, Any]) -> None:
    resp = state["response"]
    st.subheader(state["title"])
    _show_queries(state["queries"])
    total = resp.timings_ms.get("total", sum(resp.timings_ms.values()))
    st.markdown(f"**{len(resp.results)} results** · {resp.measure} ({resp.distance}) · "
                f"{resp.candidates:,} candidates · query time **{total:.1f} ms**")
    st.caption(f"stages: {ui.format_timings(resp.timings_ms)}")
    if not resp.results:
        st.info("No image of the lake matches (all were excluded?).")
        return
    for start in range(0, len(resp.results), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, r in zip(cols, resp.results[start:start + GRID_COLUMNS], strict=False):
            with col, st.container(border=True):
                thumb = state["thumbs"].get(r.image_id)
                if thumb:
                    st.image(thumb, width="stretch")
                else:
                    st.caption("(no thumbnail)")
                st.markdown(f"**#{r.rank} · {r.score:.3f}**")
                st.caption(ui.format_scores(r.scores))
                st.caption(f"{r.relpath or r.path}" + (f" · {r.label}" if r.label else ""))
                st.button("More like this", key=f"more_{r.image_id}", on_click=_more_like, args=(r.image_id,),
                          icon=":material/manage_search:", width="stretch")


st.title("Search")
status = ui.sidebar()
if status.error:
    st.error(status.error)
    st.stop()
if status.size == 0:
    ui.empty_lake_message(status)
    st.stop()

upload_tab, pick_tab = st.tabs(["Upload images", "Pick from the collection"])
with upload_tab:
    files = st.file_uploader(
        f"1 to {ui.MAX_QUERY_IMAGES} query images", type=list(ui.UPLOAD_TYPES), accept_multiple_files=True,
        key="uploads", max_upload_size=max(1, status.engine.config.max_upload_bytes // 2**20),
    ) or []
with pick_tab:
    rows = _sample(status)
    names: dict[int, str] = st.session_state.setdefault("pick_names", {})
    chosen = [i for i in st.session_state.get("picked", []) if i in names]
    # picks from an earlier sample stay selectable; appended so that the options keep their order (the widget's
    # identity depends on them, and a changed identity would drop the selection)
    options = list(dict.fromkeys([r["image_id"] for r in rows] + chosen))
    picked = st.multiselect(
        f"Images of the lake (a random sample of {len(rows)})", options, format_func=lambda i: names.get(i, f"#{i}"),
        key="picked", max_selections=ui.MAX_QUERY_IMAGES, placeholder="Choose by name or id",
    )
    st.button("New sample", on_click=_new_sample, icon=":material/shuffle:")
    with st.expander("Browse the sample", expanded=False):
        bcols = st.columns(8)
        for j, r in enumerate(rows):
            with bcols[j % 8]:
                if r.get("thumb"):
                    st.image(r["thumb"], width="stretch")
                st.caption(f"#{r['image_id']}")

c1, c2, c3 = st.columns([2, 3, 2], vertical_alignment="bottom")
measure = c1.selectbox("Measure", MEASURES, index=MEASURES.index("mix"), key="measure",
                       help="  \n".join(f"**{m}**: {text}" for m, text in ui.MEASURE_HELP.items()))
k = c2.slider("Results (k)", 1, 50, 5, key="k")
exclude = c3.checkbox("Leave the query images out", value=True, key="exclude_query",
                      help="drop the query images themselves (and exact copies) from the results")

uploads = [(f.name, f.getvalue()) for f in files]
previews = _previews(status, files, list(picked), rows)
if previews:
    st.markdown(f"**Query images** ({len(previews)})")
    _show_queries(previews)
n_queries = len(previews)
too_many = n_queries > ui.MAX_QUERY_IMAGES
if too_many:
    st.error(f"At most {ui.MAX_QUERY_IMAGES} query images at a time: you gave {n_queries} "
             f"({len(uploads)} uploaded, {len(picked)} picked). Remove {n_queries - ui.MAX_QUERY_IMAGES}.")
clicked = st.button("Search", type="primary", icon=":material/search:", disabled=too_many or n_queries == 0,
                    help=None if n_queries else "upload or pick an image first")
if n_queries == 0:
    st.caption(f"Upload 1 to {ui.MAX_QUERY_IMAGES} images or pick some from the collection, then search.")

more = st.session_state.pop(MORE_KEY, None)
if clicked:
    title = "Results for " + ", ".join([n for n, _ in uploads] + [f"#{i}" for i in picked])
    _search(status, uploads, list(picked), measure, k, exclude, title, previews)
elif more is not None:
    more = int(more)
    before = st.session_state.get(RESULT_KEY, {}).get("thumbs", {})
    preview = [(st.session_state.get("pick_names", {}).get(more, f"#{more}"), before.get(more))]
    _search(status, [], [more], measure, k, True, f"More like #{more}", preview)

result = st.session_state.get(RESULT_KEY)
if result is not None and result["lake"] == str(status.path):
    st.divider()
    _show_result(result)
