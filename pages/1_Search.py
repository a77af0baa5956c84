"""Search: 1 to 5 query images (uploaded, or picked from the lake: a sample, a folder, a file name) -> the most
similar images, with scores, per-measure ranks, what each measure contributed, paging, filters and details."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import streamlit as st

from imgrec import ingest_panel, ui
from imgrec.measures import MEASURES, distances_on

log = logging.getLogger("imgrec.app")

SAMPLE_SIZE = 24
GRID_COLUMNS = 5
PAGE_SIZE = 20
MAX_K = 100
RESULT_KEY = "search_result"  # the last search: survives reruns, so paging and "more like this" keep it visible
MORE_KEY = "search_more_like"  # image id whose "more like this" button was clicked (set by the button's callback)
NEG_KEY = "negatives"  # image ids of the lake given as "less like this"


# --- callbacks (run before the script, so they may change widget state) ------------------------------------------


def _more_like(image_id: int) -> None:
    st.session_state[MORE_KEY] = image_id


def _add_to_query(image_id: int) -> None:
    picked = list(st.session_state.get("picked", []))
    if image_id not in picked:
        picked.append(image_id)
    st.session_state["picked"] = picked[: ui.MAX_QUERY_IMAGES]
    negs = st.session_state.get(NEG_KEY, [])
    st.session_state[NEG_KEY] = [i for i in negs if i != image_id]


def _less_like(image_id: int) -> None:
    negs = list(st.session_state.get(NEG_KEY, []))
    if image_id not in negs:
        negs.append(image_id)
    st.session_state[NEG_KEY] = negs[-ui.MAX_QUERY_IMAGES:]
    st.session_state["picked"] = [i for i in st.session_state.get("picked", []) if i != image_id]


def _clear_negatives() -> None:
    st.session_state[NEG_KEY] = []


def _new_sample() -> None:
    st.session_state["sample_seed"] = random.randrange(1_000_000)


def _set_page(page: int) -> None:
    if RESULT_KEY in st.session_state:
        st.session_state[RESULT_KEY]["page"] = page


# --- the lake's images ---------------------------------------------------------------------------------------------


def _name(row: dict[str, Any]) -> str:
    label = f" ({row['label']})" if row.get("label") else ""
    return f"#{row['image_id']} · {row.get('relpath') or row.get('path')}{label}"


def _remember_names(rows: list[dict[str, Any]]) -> None:
    names = st.session_state.setdefault("pick_names", {})
    names.update({int(r["image_id"]): _name(r) for r in rows})


def _with_thumbs(status: ui.LakeStatus, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    thumbs = status.engine.thumbnails([r["image_id"] for r in rows])
    for r in rows:
        r["thumb"] = thumbs.get(r["image_id"])
    _remember_names(rows)
    return rows


def _sample(status: ui.LakeStatus) -> list[dict[str, Any]]:
    """A random sample of the lake with thumbnails, computed once per lake, snapshot and seed."""
    seed = st.session_state.setdefault("sample_seed", random.randrange(1_000_000))
    key = (str(status.path), status.snapshot, seed)
    cached = st.session_state.get("sample")
    if cached is None or cached[0] != key:
        if cached is not None and cached[0][0] != key[0]:  # another lake: its ids mean other images
            st.session_state["pick_names"] = {}
            st.session_state["picked"] = []
            st.session_state[NEG_KEY] = []
            st.session_state.pop(RESULT_KEY, None)
        cached = (key, _with_thumbs(status, status.engine.sample(SAMPLE_SIZE, seed=seed)))
        st.session_state["sample"] = cached
    return cached[1]


def _grid(rows: list[dict[str, Any]], prefix: str, columns: int = 8) -> None:
    """Thumbnails, each with an "Add" button that puts the image into the query."""
    picked = set(st.session_state.get("picked", []))
    cols = st.columns(columns)
    for j, r in enumerate(rows):
        with cols[j % columns]:
            if r.get("thumb"):
                st.image(r["thumb"], width="stretch")
            st.caption(f"#{r['image_id']} · {r.get('relpath', '')}")
            st.button("Add", key=f"{prefix}_{r['image_id']}", on_click=_add_to_query, args=(int(r["image_id"]),),
                      icon=":material/add:", disabled=int(r["image_id"]) in picked, width="stretch")


def _folder_tab(status: ui.LakeStatus) -> None:
    from imgrec import browse

    folders = _cached(status, "folders", lambda: browse.folders(status.engine))
    if not folders:
        return
    labels = [f"{f['collection']} / {f['folder'] or '(top folder)'} ({f['images']})" for f in folders]
    i = st.selectbox("Folder", range(len(folders)), format_func=lambda j: labels[j], key="browse_folder")
    chosen = folders[i or 0]
    pages = max(1, -(-int(chosen["images"]) // SAMPLE_SIZE))
    page = st.number_input("Page", 1, pages, 1, key="browse_page", help=f"{pages} pages of {SAMPLE_SIZE}") if \
        pages > 1 else 1
    _, rows = browse.images_in(status.engine, chosen["collection"], chosen["folder"], (int(page) - 1) * SAMPLE_SIZE,
                               SAMPLE_SIZE)
    _grid(_with_thumbs(status, rows), "addf")


def _name_tab(status: ui.LakeStatus) -> None:
    from imgrec import browse

    text = st.text_input("File name contains", key="find_name", placeholder="e.g. beach, IMG_20, 2019/")
    if text.strip():
        rows = browse.find_by_name(status.engine, text, limit=SAMPLE_SIZE)
        st.caption(f"{len(rows)} image(s)" + (f" (the first {SAMPLE_SIZE})" if len(rows) == SAMPLE_SIZE else ""))
        _grid(_with_thumbs(status, rows), "addn")


def _cached(status: ui.LakeStatus, what: str, compute: Any) -> Any:
    """A per-session cache of lake-wide lists (folders, labels, collections) for the current snapshot."""
    key = (str(status.path), status.snapshot, what)
    store = st.session_state.setdefault("lake_lists", {})
    if key not in store:
        store[key] = compute()
    return store[key]


# --- queries -------------------------------------------------------------------------------------------------------


def _add_uploads(status: ui.LakeStatus, files: list[Any]) -> None:
    """Keep the uploads the person asked to add: into <lake>/uploads, then a background ingestion of that folder."""
    from imgrec import jobs

    ui.require_admin("keep_uploads")
    if str(status.path).startswith("s3://"):
        st.warning("This lake is on object storage: upload the images to a prefix of the bucket and ingest that "
                   "prefix (`imgrec ingest s3://bucket/prefix --lake ...`).")
        return
    config = status.engine.config
    folder, saved, problems = ui.save_uploads(status.path, [(f.name, f.getvalue()) for f in files],
                                              config.max_upload_bytes, config.max_pixels)
    for problem in problems:
        st.warning(f"Not added: {problem}")
    if not saved:
        return
    try:
        jobs.start(folder, status.path)
    except jobs.JobError as exc:
        st.warning(f"Saved {len(saved)} upload(s) in `{folder}`, but the ingestion cannot start now: {exc}. "
                   "Add that folder from the Collection page later.")
        return
    st.success(f"Saved {len(saved)} upload(s) in `{folder}`; they are being ingested in the background (progress "
               "on the Collection page) and become searchable when that run ends.")


def _upload_previews(files: list[Any], state_key: str) -> list[tuple[str, bytes | None]]:
    """(caption, thumbnail) of each uploaded file; one that cannot be decoded has no thumbnail."""
    cached: dict[str, bytes | None] = st.session_state.get(state_key, {})
    current = {}
    out: list[tuple[str, bytes | None]] = []
    for f in files:
        fid = getattr(f, "file_id", None) or f"{f.name}:{f.size}"
        current[fid] = cached[fid] if fid in cached else ui.query_thumbnail(f.getvalue())
        out.append((f.name if current[fid] else f"{f.name} (cannot be read)", current[fid]))
    st.session_state[state_key] = current  # only the files still uploaded
    return out


def _id_previews(status: ui.LakeStatus, ids: list[int]) -> list[tuple[str, bytes | None]]:
    thumbs = status.engine.thumbnails(ids)
    names = st.session_state.get("pick_names", {})
    return [(names.get(i, f"#{i}"), thumbs.get(i)) for i in ids]


@st.cache_data(show_spinner=False, max_entries=256)
def _small(thumb: bytes, side: int) -> bytes:
    """A thumbnail of at most ``side`` px (at least 1 px each way: st.image's own resize to a width fails on a
    256 x 1 strip)."""
    return ui.query_thumbnail(thumb, side) or thumb


def _show_queries(previews: list[tuple[str, bytes | None]], width: int = 72) -> None:
    """The query images in one compact row (thumbnails with their names)."""
    shown = [(name, thumb) for name, thumb in previews if thumb]
    if shown:
        st.image([_small(t, width) for _, t in shown], caption=[n for n, _ in shown])
    missing = [name for name, thumb in previews if not thumb]
    if missing:
        st.caption(", ".join(missing))


def _options(status: ui.LakeStatus) -> dict[str, Any]:
    """The search settings from the widgets (measure, distance, k or threshold, filters, weights)."""
    c1, c2 = st.columns(2, vertical_alignment="bottom")
    measure = c1.selectbox("Measure", MEASURES, index=MEASURES.index("mix"), key="measure",
                           help="  \n".join(f"**{m}**: {text}" for m, text in ui.MEASURE_HELP.items()))
    if measure == "mix":
        c2.selectbox("Distance", ["fused"], key="distance_mix", disabled=True,
                     help="mix fuses each measure's default distance; set the weights below")
        distance = None
    else:
        index = status.engine.index if status.engine is not None else None
        offered = distances_on(index, measure)
        distance = c2.selectbox("Distance", offered, key=f"distance_{measure}",
                                help="layout: colours and where they are (a few regions) and how they clump; "
                                     "the others compare one colour histogram" if measure == "color" else None)
    mode = st.radio("Mode", ["Top k", "Range"], key="mode", horizontal=True,
                    help="Top k: the k best images. Range: every image scoring at least the threshold "
                         "(up to 1000).")
    if mode == "Range":
        threshold = st.slider("Similarity at least", 0.0, 1.0, 0.8, 0.01, key="threshold")
        k = MAX_K
    else:
        threshold = None
        k = st.slider("Results (k)", 1, MAX_K, 5, key="k")
    exclude = st.checkbox("Leave the query images out", value=True, key="exclude_query",
                          help="drop the query images themselves (and exact copies) from the results")
    opts: dict[str, Any] = {"measure": measure, "k": k, "distance": distance, "threshold": threshold,
                            "exclude_query": exclude}
    return opts


def _filters(status: ui.LakeStatus, opts: dict[str, Any]) -> None:
    from imgrec import browse

    with st.expander("Filters and mix weights", icon=":material/tune:"):
        folders = _cached(status, "folders", lambda: browse.folders(status.engine))
        labels = _cached(status, "labels", lambda: browse.label_counts(status.engine))
        collections = sorted({f["collection"] for f in folders})
        opts["collections"] = st.multiselect("Collections", collections, key="f_collections") or None
        folder_names = sorted({f["folder"] for f in folders if f["folder"]})
        opts["folders"] = st.multiselect("Folders (with sub-folders)", folder_names, key="f_folders") or None
        counts = dict(labels)
        opts["labels"] = st.multiselect("Predicted label", [lab for lab, _ in labels], key="f_labels",
                                        format_func=lambda lab: f"{lab} ({counts.get(lab, 0)})") or None
        st.markdown("**Mix weights** (used by the *mix* measure)")
        defaults = status.engine.config.weights
        weights = {
            "embedding": st.slider("embedding", 0.0, 1.0, float(defaults.get("embedding", 0.85)), 0.05, key="w_embedding"),
            "color": st.slider("colour", 0.0, 1.0, float(defaults.get("color", 0.05)), 0.05, key="w_color"),
            "hash": st.slider("hash", 0.0, 1.0, float(defaults.get("hash", 0.3)), 0.05, key="w_hash"),
        }
        applied = status.engine.mix(weights).weights_on(status.engine.index) if status.engine.index is not None \
            else weights
        agreement = (status.engine.index.meta.get("color_agreement") or {}).get("value") \
            if status.engine.index is not None else None
        if weights["color"] > 0 and applied.get("color", 0.0) < weights["color"] and agreement is not None:
            st.caption(f"On this collection colour agrees little with content (agreement {agreement:.2f}, below "
                       f"{status.engine.config.mix_gate_floor + 0.05:.2f}), so the mix counts colour "
                       f"{applied['color'] / weights['color']:.0%} of its weight; set embedding and hash to 0 to "
                       "rank by colour alone.")
        opts["weights"] = weights if opts["measure"] == "mix" else None
        opts["aggregate"] = st.selectbox(
            "Several query images", ["softmin", "mean", "min"], key="aggregate",
            help="softmin: close to every query image (default); mean: average; min: the worst match counts")
        opts["negative_weight"] = st.slider(
            "Weight of 'less like this'", 0.0, 1.0, 0.5, 0.05, key="negative_weight",
            help="the score loses this times the image's similarity to its closest negative example")


# --- searching and showing ----------------------------------------------------------------------------------------


def _search(status: ui.LakeStatus, uploads: Sequence[tuple[str, bytes]], picked: Sequence[int],
            opts: dict[str, Any], title: str, previews: list[tuple[str, bytes | None]],
            neg_uploads: Sequence[tuple[str, bytes]] = (), neg_ids: Sequence[int] = (),
            neg_previews: Sequence[tuple[str, bytes | None]] = ()) -> None:
    """Run one search and keep its outcome in the session (errors as st.error, never a traceback)."""
    from imgrec.lake import LakeError
    from imgrec.search import QueryError

    st.session_state.pop(RESULT_KEY, None)
    try:
        with st.spinner("Searching…"):
            resp = ui.run_search(status.engine, uploads, picked, negative_uploads=neg_uploads,
                                 negative_ids=neg_ids, **opts)
    except (QueryError, LakeError) as exc:
        st.error(f"Cannot search: {exc}")
        return
    except Exception as exc:  # a bug: say so in words, keep the details in the server's log
        log.exception("search failed")
        st.error(f"The search failed unexpectedly ({type(exc).__name__}: {exc}). Details are in the server log.")
        return
    _remember_names([{"image_id": r.image_id, "relpath": r.relpath, "path": r.path, "label": r.label}
                     for r in resp.results])
    st.session_state[RESULT_KEY] = {"lake": str(status.path), "title": title, "response": resp, "page": 0, "opts": opts,
                                    "queries": previews, "negatives": list(neg_previews), "thumbs": {},
                                    "rendered": False}


def _details(status: ui.LakeStatus, r: Any, state: dict[str, Any]) -> None:
    """The full image with its metadata, its palette beside the query images', and its path."""
    from imgrec import browse
    from imgrec.features.color import palette

    engine = status.engine
    try:
        info = browse.details(engine, r.image_id)
    except KeyError:
        st.error(f"Image #{r.image_id} is no longer in the lake.")
        return
    bins = tuple(engine.index.meta["color_bins"]) if engine.index else (8, 4, 4)
    left, right = st.columns([3, 2])
    with left:
        try:
            st.image(browse.full_image(engine, r.image_id), width="stretch")
        except Exception as exc:  # gone, changed, unreadable, outside the collection
            st.warning(f"Cannot show the file: {exc}")
            thumb = state["thumbs"].get(r.image_id)
            if thumb:
                st.image(thumb)
        st.code(r.path, language=None)
    with right:
        st.markdown(f"**#{r.rank} · score {r.score:.3f}**")
        st.caption("scores: " + ui.format_scores(r.scores))
        st.caption("rank under each measure (among the candidates): " + ui.format_ranks(r.ranks))
        if info.get("hist") is not None:
            st.markdown("Palette of this image")
            st.html(ui.swatches(palette(info["hist"], bins)))
        resp = state["response"]
        for (name, _), hist in zip(state["queries"], resp.query_hists, strict=False):
            st.markdown(f"Palette of the query {name}")
            st.html(ui.swatches(palette(hist, bins)))
        meta = {
            "image id": info["image_id"], "collection": info["collection"], "file": info["relpath"],
            "size": f"{info['width']} x {info['height']} px, {int(info['size_bytes'] or 0) / 1e3:,.0f} kB",
            "format": f"{info['format']} ({info['mode']})", "modified": str(info.get("mtime") or "")[:19],
            "content hash": info.get("content_hash"),
        }
        st.dataframe([{"field": k, "value": str(v)} for k, v in meta.items()], hide_index=True, width="stretch")
        if info.get("labels"):
            st.markdown("Predicted labels (ImageNet)")
            st.dataframe([{"label": lab, "probability": round(float(p), 3)}
                          for lab, p in zip(info["labels"], info["probs"] or [], strict=False)],
                         hide_index=True, width="stretch")


@st.dialog("Image details", width="large")
def _details_dialog(status: ui.LakeStatus, r: Any, state: dict[str, Any]) -> None:
    _details(status, r, state)


def _card(status: ui.LakeStatus, r: Any, state: dict[str, Any], mix: bool) -> None:
    thumb = state["thumbs"].get(r.image_id)
    if thumb:
        st.image(thumb, width="stretch")
    else:
        st.caption("(no thumbnail)")
    st.markdown(f"**#{r.rank} · {r.score:.3f}**")
    st.html(ui.contribution_bar(r.score, r.contributions if mix else {}, state["response"].measure))
    st.caption(ui.format_scores(r.scores))
    st.caption("ranks: " + ui.format_ranks(r.ranks), help="rank of this image under each measure alone, among the "
               "candidates of this search")
    st.caption(f"{r.relpath or r.path}" + (f" · {r.label}" if r.label else ""))
    st.button("More like this", key=f"more_{r.image_id}", on_click=_more_like, args=(r.image_id,),
              icon=":material/manage_search:", width="stretch", help="search with this image alone (its stored "
              "features: nothing is re-computed)")
    b1, b2, b3 = st.columns(3)
    b1.button("", key=f"add_{r.image_id}", on_click=_add_to_query, args=(r.image_id,), icon=":material/add:",
              help="add to the query images", width="stretch")
    b2.button("", key=f"less_{r.image_id}", on_click=_less_like, args=(r.image_id,), icon=":material/remove:",
              help="less like this: add as a negative example", width="stretch")
    if b3.button("", key=f"details_{r.image_id}", icon=":material/open_in_full:", help="the full image, its "
                 "metadata and palette", width="stretch"):
        _details_dialog(status, r, state)


def _show_result(status: ui.LakeStatus, state: dict[str, Any], shown_above: list[Any]) -> None:
    t0 = time.perf_counter()
    resp = state["response"]
    st.subheader(state["title"])
    if state["queries"] != shown_above:  # the same query images are right above
        _show_queries(state["queries"], width=48)
    if state["negatives"]:
        st.caption("less like:")
        _show_queries(state["negatives"], width=48)
    total = resp.timings_ms.get("total", sum(resp.timings_ms.values()))
    threshold = state.get("opts", {}).get("threshold")
    mode = f" · every image scoring at least {threshold:.2f}" if threshold is not None else ""
    st.markdown(f"**{len(resp.results)} results** · {resp.measure} ({resp.distance}) · "
                f"{resp.candidates:,} candidates · query time **{total:.1f} ms**{mode}")
    legend = " · :blue[■] embedding :orange[■] color :green[■] hash: what each contributed to the score" \
        if resp.measure == "mix" else ""  # the colours of ui.MEASURE_COLORS, by name
    st.caption(f"stages: {ui.format_timings(resp.timings_ms)}{legend}")
    if resp.missing:  # a served shard did not answer: these results are from the rest
        st.warning("Part of the collection was not searched: " + "; ".join(resp.missing))
    if not resp.results:
        st.info("No image of the lake matches (all were excluded or filtered out, or none reaches the threshold).")
        return
    per_page = PAGE_SIZE
    if len(resp.results) > 10:
        per_page = st.selectbox("Per page", [10, 20, 50], index=1, key="per_page")
    pages = -(-len(resp.results) // per_page)
    page = min(state.get("page", 0), pages - 1)
    shown = resp.results[page * per_page:(page + 1) * per_page]
    missing = [r.image_id for r in shown if r.image_id not in state["thumbs"]]
    if missing:
        state["thumbs"].update(status.engine.thumbnails(missing))
    for start in range(0, len(shown), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, r in zip(cols, shown[start:start + GRID_COLUMNS], strict=False):
            with col, st.container(border=True):
                _card(status, r, state, resp.measure == "mix")
    if pages > 1:
        st.caption(f"page {page + 1} of {pages} ({per_page} per page)")
        cols = st.columns(min(pages, 10))
        for p in range(min(pages, 10)):
            cols[p].button(f"{p + 1}", key=f"page_{p}", on_click=_set_page, args=(p,), disabled=p == page,
                           width="stretch")
    if not state["rendered"]:  # the first drawing of these results: its time goes to the profiling page
        state["rendered"] = True
        status.engine.record_stage(resp.query_id, "render", (time.perf_counter() - t0) * 1000.0)


# --- a lake that is empty, or still filling -----------------------------------------------------------------------


def _first_run(status: ui.LakeStatus) -> None:
    """An empty lake: the folder form itself (the search opens as soon as the first images are searchable)."""
    if ingest_panel.job_running(status):
        st.info("The first images are being added: the search opens here as soon as they are searchable (a few "
                "seconds after the start).")
    elif ui.is_admin():
        where, made = ("There is no lake at", "the lake is made from it") if not status.exists else \
            ("The lake has no images yet:", "its images are added")
        st.info(f"{where} `{status.path}`. Give a folder of photos on this machine (sub-folders included) and press "
                f"**Start**: {made}, in the background, and you can search as soon as the first images are in. Or "
                "point the sidebar's *Lake folder* at an existing lake.")
    else:
        st.info(f"This collection (`{status.path.name}`) has no images yet: an admin can add a folder of photos "
                "(sign in from the sidebar).")
    if status.note:
        st.info(status.note)
    ingest_panel.panel(status, rerun_when_searchable=True)


def _still_filling(status: ui.LakeStatus) -> None:
    """While an ingestion into this lake runs: what the search covers so far."""
    from imgrec import jobs

    job = jobs.current(str(status.path))

    @st.fragment(run_every=2.0)
    def line() -> None:
        state = job.state() if job is not None else None
        if state is None or not state.running:
            return
        total = state.total or 0
        if state.phase == "map":
            st.caption(f":material/hourglass_top: The ingestion of `{state.folder}` is done; the map of the "
                       "collection for the Explorer is being made.")
            return
        if 0 < status.size <= total:
            text = f"Searching {status.size:,} of {total:,} images so far"
        else:
            text = f"Searching the {status.size:,} images indexed so far"
        st.caption(f":material/hourglass_top: {text} · the ingestion of `{state.folder}` goes on ({state.done:,} of "
                   f"{total:,} files done); each new search covers what is searchable by then.")

    line()


# --- the page ------------------------------------------------------------------------------------------------------

status = ui.page_start("Search", ":material/image_search:", need_images=False)
if status.size == 0:
    _first_run(status)
    st.stop()
if ingest_panel.job_running(status):
    _still_filling(status)

max_mb = max(1, status.engine.config.max_upload_bytes // 2**20)
upload_tab, pick_tab, folder_tab, name_tab = st.tabs(
    ["Upload images", "Pick from the collection", "Browse folders", "Find by file name"])
with upload_tab:
    files = st.file_uploader(
        f"1 to {ui.MAX_QUERY_IMAGES} query images", type=list(ui.UPLOAD_TYPES), accept_multiple_files=True,
        key="uploads", max_upload_size=max_mb,
        help="Uploads are searched in memory, never written to disk, and forgotten when this session ends.",
    ) or []
    with st.expander("Less like these (optional negative examples)", icon=":material/thumb_down:"):
        neg_files = st.file_uploader(
            "Negative examples", type=list(ui.UPLOAD_TYPES), accept_multiple_files=True,
            key="neg_uploads", max_upload_size=max_mb, label_visibility="collapsed",
        ) or []

with pick_tab:
    rows = _sample(status)
    names: dict[int, str] = st.session_state.setdefault("pick_names", {})
    chosen = [i for i in st.session_state.get("picked", []) if i in names]
    # picks from elsewhere (an earlier sample, a folder, a result) stay selectable; appended so that the options
    # keep their order (the widget's identity depends on them, and a changed identity would drop the selection)
    options = list(dict.fromkeys([r["image_id"] for r in rows] + chosen))
    picked = st.multiselect(
        f"Images of the lake (a random sample of {len(rows)}, or added from elsewhere)", options,
        format_func=lambda i: names.get(i, f"#{i}"), key="picked", max_selections=ui.MAX_QUERY_IMAGES,
        placeholder="Choose by name or id",
    )
    st.button("New sample", on_click=_new_sample, icon=":material/shuffle:")
    with st.expander("Browse the sample", expanded=False):
        _grid(rows, "adds")
with folder_tab:
    _folder_tab(status)
with name_tab:
    _name_tab(status)

with st.sidebar:  # the settings beside the page, so that the results come right below the query images
    st.subheader("Search settings")
    opts = _options(status)
    _filters(status, opts)

uploads = [(f.name, f.getvalue()) for f in files]
neg_uploads = [(f.name, f.getvalue()) for f in neg_files]
neg_ids = [int(i) for i in st.session_state.get(NEG_KEY, [])]
previews = _upload_previews(files, "upload_thumbs") + _id_previews(status, list(picked))
neg_previews = _upload_previews(neg_files, "neg_upload_thumbs") + _id_previews(status, neg_ids)
n_queries = len(previews)
too_many = n_queries > ui.MAX_QUERY_IMAGES
if too_many:
    st.error(f"At most {ui.MAX_QUERY_IMAGES} query images at a time: you gave {n_queries} "
             f"({len(uploads)} uploaded, {len(picked)} picked). Remove {n_queries - ui.MAX_QUERY_IMAGES}.")
# the query images, their negatives and the buttons in one row: the results come right below
q1, q2 = st.columns([3, 1], vertical_alignment="center")
with q1:
    if previews:
        _show_queries(previews, width=64)
    if neg_previews:
        st.markdown(f"**Less like these** ({len(neg_previews)})")
        _show_queries(neg_previews, width=48)
    if n_queries == 0:
        st.caption(f"Upload 1 to {ui.MAX_QUERY_IMAGES} images or pick some from the collection, then search.")
with q2:
    clicked = st.button("Search", type="primary", icon=":material/search:", disabled=too_many or n_queries == 0,
                        help=None if n_queries else "upload or pick an image first", width="stretch")
    if files and ui.is_admin() and st.button(
            "Add to the lake", key="add_uploads", icon=":material/add_photo_alternate:", width="stretch",
            help="copy the uploaded query images into the lake's own uploads folder and ingest them in the "
                 "background, so that they become searchable images of the collection"):
        _add_uploads(status, files)
    if neg_ids:
        st.button("Clear the negative examples", on_click=_clear_negatives, icon=":material/clear:",
                  width="stretch")

more = st.session_state.pop(MORE_KEY, None)
if clicked:
    title = "Results for " + ", ".join([n for n, _ in uploads] + [f"#{i}" for i in picked])
    _search(status, uploads, list(picked), opts, title, previews, neg_uploads, neg_ids, neg_previews)
elif more is not None:
    more = int(more)
    alone = {**opts, "exclude_query": True}
    _search(status, [], [more], alone, f"More like #{more}", _id_previews(status, [more]))

result = st.session_state.get(RESULT_KEY)
if result is not None and result["lake"] == str(status.path):
    _show_result(status, result, previews)
