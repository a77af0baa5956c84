"""Collection: what the lake holds (counts, formats, sizes, dimensions, labels), the files it could not read,
duplicate groups (exact and near), and adding a folder of images in the background."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import streamlit as st

from imgrec import ingest_panel, ui

if TYPE_CHECKING:
    from imgrec.collection import DuplicateGroup, Duplicates
    from imgrec.search import Engine

log = logging.getLogger("imgrec.app")

MAX_GROUPS = 200  # groups computed with their members; the page shows the first "Groups shown" of them
MAX_MEMBERS = 16  # thumbnails shown per group
THUMB = 150  # thumbnail width in pixels
MEASURE_BITS = {"phash+dhash": 128, "phash": 64, "dhash": 64}


# --- cached computations: process-wide, one entry per (lake, snapshot, parameters) ---------------------------------


@st.cache_data(show_spinner=False, max_entries=32)
def _overview(lake: str, snapshot: int, _engine: Engine) -> dict[str, Any]:
    from imgrec import collection as col

    return {
        "overview": col.overview(_engine), "sizes": col.size_histogram(_engine),
        "dimensions": col.dimension_histogram(_engine), "quantiles": col.quantiles(_engine),
        "common": col.common_dimensions(_engine), "labels": col.top_labels(_engine, 25),
        "runs": col.recent_runs(_engine), "reasons": col.skipped_reasons(_engine),
        "skipped": col.skipped_files(_engine, 2000),
    }


@st.cache_data(show_spinner="Grouping exact copies…", max_entries=32)
def _exact(lake: str, snapshot: int, _engine: Engine) -> Duplicates:
    from imgrec.collection import exact_duplicates

    return exact_duplicates(_engine, limit=MAX_GROUPS)


@st.cache_data(show_spinner="Finding near-duplicates…", max_entries=32)
def _near(lake: str, snapshot: int, measure: str, max_distance: int, _engine: Engine) -> Duplicates:
    from imgrec.collection import near_duplicates

    return near_duplicates(_engine, max_distance, measure, limit=MAX_GROUPS)


@st.cache_data(show_spinner=False, max_entries=64)
def _thumbs(lake: str, snapshot: int, ids: tuple[int, ...], _engine: Engine) -> dict[int, bytes]:
    return _engine.thumbnails(list(ids))


# --- small helpers -------------------------------------------------------------------------------------------------


def _mb(n: int | float | None) -> str:
    n = float(n or 0)
    if n >= 2**30:
        return f"{n / 2**30:.2f} GB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 2**10:.0f} KB"


def _bar(rows: list[dict[str, Any]], x: str, y: str, *, sort: str | list[str] | None = None, color: str | None = None,
         horizontal: bool = False, height: int = 260, step: int = 24) -> None:
    """An Altair bar chart of ``rows`` (count ``y`` per category ``x``); a horizontal one is ``step`` px a category
    (a fixed pixel height left no room for the bar of a single category: an empty axis on a lake of one format)."""
    import altair as alt

    if not rows:
        st.caption("(nothing to show)")
        return
    data = alt.Data(values=rows)
    axis = alt.Axis(labelLimit=240, labelOverlap=False)
    cat = (alt.X(f"{x}:N", sort=sort, title=None, axis=axis) if not horizontal
           else alt.Y(f"{x}:N", sort=sort, title=None, axis=axis))
    num = alt.Y(f"{y}:Q", title=y) if not horizontal else alt.X(f"{y}:Q", title=y)
    enc: dict[str, Any] = {"x": cat, "y": num} if not horizontal else {"y": cat, "x": num}
    enc["tooltip"] = [f"{x}:N", f"{y}:Q"] + ([f"{color}:N"] if color else [])
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=None)
    size = alt.Step(step) if horizontal else height
    st.altair_chart(alt.Chart(data).mark_bar().encode(**enc).properties(height=size), width="stretch")


# --- the lake ------------------------------------------------------------------------------------------------------


def _show_overview(status: ui.LakeStatus, data: dict[str, Any]) -> None:
    ov = data["overview"]
    st.dataframe([{"collection": c["collection"], "folder": c["root"], "images": c["images"],
                   "size": _mb(c["bytes"])} for c in ov.collections], hide_index=True, width="stretch")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Formats** (images)")
        _bar(ov.formats, "format", "images", sort="-x", horizontal=True, step=26)
    with c2:
        st.markdown("**File sizes** (images per size range)")
        _bar(data["sizes"], "bin", "images", sort=[r["bin"] for r in data["sizes"]])
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Dimensions** (longer side)")
        bins = list(dict.fromkeys(r["bin"] for r in data["dimensions"]))
        _bar(data["dimensions"], "bin", "images", sort=bins, color="orientation")
    with c2:
        st.markdown("**Quantiles**")
        st.dataframe(data["quantiles"], hide_index=True, width="stretch")
        st.markdown("**Most frequent dimensions**")
        st.dataframe(data["common"], hide_index=True, width="stretch")
    st.markdown("**What the model sees most** (the top ImageNet label of each image)")
    labels = data["labels"]
    if labels:
        _bar(labels, "label", "images", sort="-x", horizontal=True, step=22)
        st.caption(f"{ov.labelled:,} of {ov.images:,} images labelled; the table has each label's mean "
                   "probability")
        with st.expander("Labels table"):
            st.dataframe(labels, hide_index=True, width="stretch")
    else:
        st.caption("No labels yet.")
    if data["runs"]:
        st.markdown("**Recent ingestions**")
        st.dataframe(data["runs"], hide_index=True, width="stretch")


def _show_group(group: DuplicateGroup, thumbs: dict[int, bytes], n: int) -> None:
    hashes: dict[str, int] = {}
    for m in group.members:
        hashes[m.content_hash] = hashes.get(m.content_hash, 0) + 1
    members = group.members[:MAX_MEMBERS]
    width: int | str = len(members) * (THUMB + 12) + 40 if len(members) <= 6 else "stretch"
    with st.container(border=True, width=width):
        if group.kind == "exact":
            st.markdown(f"**{n}** · {group.size} identical files · {_mb(group.members[0].size_bytes)} each")
        else:
            st.markdown(f"**{n}** · {group.size} images · at most {group.max_distance} bits apart")
        with st.container(horizontal=True, gap="small"):
            for m in members:
                with st.container(width=THUMB + 8):
                    thumb = thumbs.get(m.image_id)
                    if thumb:
                        st.image(thumb, width=THUMB)
                    dims = f"{m.width}×{m.height}" if m.width else "?"
                    note = ""
                    if group.kind == "near":
                        note = " · largest" if m is group.members[0] else f" · Δ {m.distance} bits"
                        if hashes[m.content_hash] > 1:
                            note += " · exact copy"
                    st.caption(f"#{m.image_id} · {m.relpath} · {dims} · {_mb(m.size_bytes)}{note}")
        if group.size > len(members):
            st.caption(f"… and {group.size - len(members)} more: "
                       + ", ".join(f"#{m.image_id}" for m in group.members[len(members):len(members) + 30]))


def _show_groups(status: ui.LakeStatus, dups: Duplicates, shown: int) -> None:
    engine = status.engine
    groups = dups.groups[:shown]
    ids = tuple(sorted({m.image_id for g in groups for m in g.members[:MAX_MEMBERS]}))
    thumbs = _thumbs(str(status.path), status.snapshot, ids, engine) if ids else {}
    with st.container(horizontal=True, wrap=True, gap="small"):  # small groups side by side
        for n, group in enumerate(groups, 1):
            _show_group(group, thumbs, n)
    if dups.total_groups > len(groups):
        st.caption(f"Showing {len(groups)} of {dups.total_groups:,} groups (largest first).")


def _show_duplicates(status: ui.LakeStatus) -> None:
    from imgrec.collection import DEFAULT_MAX_DISTANCE, DEFAULT_MEASURE, HASH_MEASURES

    lake, snap, engine = str(status.path), status.snapshot, status.engine
    st.caption("**Duplicates are the same picture**: exact copies (identical bytes), or near copies (resized, "
               "re-encoded, recompressed; perceptual hashes a few bits apart). Pictures that are only alike (the "
               "same subject, another shot) are not duplicates: find those with the **Search** page.")
    st.page_link("pages/1_Search.py", label="Similar pictures: the Search page", icon=":material/image_search:")
    shown = st.select_slider("Groups shown (largest first)", [5, 10, 20, 50, 100, MAX_GROUPS], 10,
                             key="collection_groups_shown")

    st.subheader("Exact duplicates: same bytes")
    exact = _exact(lake, snap, engine)
    if not exact.total_groups:
        st.success("No exact copies: every file has different bytes.")
    else:
        st.markdown(f"**{exact.total_groups:,} groups** · {exact.images:,} files · "
                    f"{_mb(exact.redundant_bytes)} in redundant copies")
        _show_groups(status, exact, shown)

    st.subheader("Near duplicates: same picture, other file")
    c1, c2 = st.columns([1, 3])
    measure = c1.selectbox("Hash", list(HASH_MEASURES), index=list(HASH_MEASURES).index(DEFAULT_MEASURE),
                           key="collection_measure",
                           help="phash+dhash: both 64-bit hashes (128 bits), the most specific; phash: the DCT "
                                "hash alone; dhash: the gradient hash alone")
    bits = MEASURE_BITS[measure]
    default = DEFAULT_MAX_DISTANCE[measure]
    key = f"collection_max_distance_{measure}"
    max_distance = c2.slider(f"Max. Hamming distance (bits of {bits})", 0, bits // 4, default, key=key,
                             help=f"two images closer than this are linked; groups are chained links. Default "
                                  f"{default}: resized and JPEG q=60 copies are within it, distinct photos rarely")
    near = _near(lake, snap, measure, int(max_distance), engine)
    st.caption(f"{near.stats.get('hashes', status.size):,} images compared in {near.seconds:.2f} s by multi-index "
               f"hashing (no all-pairs scan) · {near.stats.get('pairs', 0):,} linked pairs. Groups of exact copies "
               "only are listed above, not here.")
    if not near.total_groups:
        st.success(f"No near-duplicates within {max_distance} bits.")
    else:
        st.markdown(f"**{near.total_groups:,} groups** · {near.images:,} images · "
                    f"{_mb(near.redundant_bytes)} beyond the largest image of each group")
        _show_groups(status, near, shown)


def _show_skipped(data: dict[str, Any]) -> None:
    reasons, files = data["reasons"], data["skipped"]
    if not files:
        st.success("Every image file found was ingested: no unreadable files.")
        return
    st.markdown(f"**{sum(r['files'] for r in reasons):,} files** found but not ingested, by reason:")
    st.dataframe(reasons, hide_index=True, width="stretch")
    st.dataframe([{"path": f["path"], "reason": f["reason"], "size": _mb(f["size_bytes"]) if f["size_bytes"] else "",
                   "seen": f["at"]} for f in files], hide_index=True, width="stretch")
    if len(files) >= 2000:
        st.caption("The first 2,000 files (path order); `imgrec stats --json` lists all.")


def _show_lake(status: ui.LakeStatus) -> None:
    data = _overview(str(status.path), status.snapshot, status.engine)
    ov = data["overview"]
    cols = st.columns(5)
    cols[0].metric("Images", f"{ov.images:,}")
    cols[1].metric("Collections", len(ov.collections))
    cols[2].metric("Total size", _mb(ov.bytes))
    cols[3].metric("Formats", len(ov.formats))
    cols[4].metric("Unreadable files", f"{ov.skipped:,}")
    overview_tab, dup_tab, skipped_tab = st.tabs(["Overview", "Duplicates", f"Unreadable files ({ov.skipped:,})"])
    for tab, draw in ((overview_tab, lambda: _show_overview(status, data)), (dup_tab, lambda: _show_duplicates(status)),
                      (skipped_tab, lambda: _show_skipped(data))):
        with tab:
            try:
                draw()
            except Exception as exc:  # a bug or an unreadable lake: say so in words, details in the server log
                log.exception("collection page section failed")
                st.error(f"This section cannot be shown ({type(exc).__name__}: {exc}). Details are in the server log.")


status = ui.page_start("Collection", ":material/photo_library:", need_images=False)
ingesting = ingest_panel.job_running(status)
if status.size == 0:
    if ingesting:
        st.info(f"Images are being added to `{status.path}` (below); this page fills in when the run completes.")
    else:
        where = "There is no lake at" if not status.exists else "The lake has no images yet:"
        st.info(f"{where} `{status.path}`. Add a first folder of images below (sub-folders included); the lake is "
                "created with it. Or point the sidebar's *Lake folder* at an existing lake.")
        if status.note:
            st.info(status.note)
ingest_panel.panel(status)
if status.size > 0:
    if status.note and not ingesting:  # while our run goes on, its progress says why the index lags
        st.info(status.note)
    try:
        _show_lake(status)
    except Exception as exc:
        log.exception("collection page failed")
        st.error(f"The collection cannot be shown ({type(exc).__name__}: {exc}). Details are in the server log.")
