"""Explorer: the map of every image (``imgrec project``): a density of the whole collection with a sample of points
(or every point of a zoomed region) coloured by cluster, folder, predicted label or mean colour; thumbnails on hover;
a selected region's images; the 3D view; the colour analysis; the clusters; and what the map shows (measured)."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from imgrec import ingest_panel, ui

if TYPE_CHECKING:
    import numpy as np

    from imgrec.projection import Maps

log = logging.getLogger("imgrec.app")

MAX_POINTS = 5000  # points sent to the browser at most (the density covers every image)
THUMB_POINTS = 2000  # hover thumbnails only up to this many points
THUMB_PX = 64
MAX_3D = 20_000
REGION_IMAGES = 24
SEARCH_PAGE = "pages/1_Search.py"
COLOR_BY = {"cluster": "Cluster", "top": "Top folder", "collection": "Collection", "label": "Predicted label",
            "mean": "Mean colour"}
METHOD_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}
CATEGORY20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
              "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
              "#17becf", "#9edae5"]  # d3's category20 (the same colours in the 2D and the 3D views)


# --- data, cached per lake and file version --------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st_ = path.stat()
        return st_.st_mtime_ns, st_.st_size
    except FileNotFoundError:
        return 0, 0


@st.cache_resource(show_spinner="Reading the map…", max_entries=4)
def _maps(lake: str, stamp: tuple[int, int]) -> Maps | None:
    from imgrec.projection import read_maps

    return read_maps(lake)


@st.cache_resource(show_spinner="Reading the images' metadata…", max_entries=4)
def _image_info(lake: str, snapshot: int, _status: ui.LakeStatus) -> dict[str, Any]:
    """Per image of the index (sorted ids): collection, top folder, relpath, predicted label, mean colour."""
    import numpy as np

    from imgrec.projection import mean_rgb

    engine = _status.engine
    assert engine is not None and engine.index is not None
    ids = np.asarray(engine.index.ids)
    rows = engine.cursor().execute(
        "SELECT i.image_id, i.collection, split_part(i.relpath, '/', 1), i.relpath, coalesce(l.label, '') "
        "FROM images i LEFT JOIN labels l USING (image_id) ORDER BY i.image_id").fetchall()
    meta = {int(r[0]): r[1:] for r in rows}
    cols = list(zip(*[meta.get(int(i), ("", "", "", "")) for i in ids], strict=True)) if len(ids) else [(), (), (), ()]
    bins = tuple(engine.conn.manifest.color_bins) if engine.conn and engine.conn.manifest else (8, 4, 4)
    rgb = np.concatenate([mean_rgb(engine.index.color[s:s + 50_000], bins) for s in range(0, len(ids), 50_000)]) \
        if len(ids) else np.zeros((0, 3), np.uint8)
    return {"ids": ids, "collection": np.asarray(cols[0], dtype=object), "top": np.asarray(cols[1], dtype=object),
            "relpath": np.asarray(cols[2], dtype=object), "label": np.asarray(cols[3], dtype=object), "rgb": rgb}


@st.cache_data(show_spinner=False, max_entries=64)
def _thumb_uris(lake: str, snapshot: int, ids: tuple[int, ...], _status: ui.LakeStatus) -> dict[int, str]:
    """Small JPEG data URIs of the given images (for hover tooltips)."""
    from PIL import Image

    assert _status.engine is not None
    out = {}
    for i, data in _status.engine.thumbnails(list(ids)).items():
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=70)
            out[i] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except OSError:
            continue
    return out


def _evaluation(lake: Path) -> dict[str, Any] | None:
    import json

    from imgrec.projection import evaluation_path, fetch

    try:
        fetch(lake, evaluation_path(lake))
        return json.loads(evaluation_path(lake).read_text())
    except (FileNotFoundError, ValueError):
        return None


# --- actions ------------------------------------------------------------------------------------------------------


def _open_in_search(image_id: int, name: str) -> None:
    """Put the image into the Search page's query (as "more like this") and go there."""
    names = dict(st.session_state.get("pick_names", {}))
    names[int(image_id)] = name
    st.session_state["pick_names"] = names
    st.session_state["picked"] = [int(image_id)]
    st.switch_page(SEARCH_PAGE)


def _make_map(status: ui.LakeStatus) -> None:
    from pipelines.project import Params, project

    ui.require_admin("make_map")
    with st.spinner("Mapping every image (PCA + UMAP, 2D, embeddings)…"):
        project(status.path, "embedding", Params())
    st.cache_resource.clear()


def _map_coming(status: ui.LakeStatus) -> bool:
    """Where an ingestion started from the app runs on this lake, its end makes the map: say so, with its progress,
    and show the map when it is there. False where no such run is going on."""
    from imgrec import jobs

    job = jobs.current(str(status.path))
    if job is None or not job.running:
        return False

    @st.fragment(run_every=2.0)
    def progress() -> None:
        state = job.state()
        if not state.running:
            st.rerun()  # the whole page: the map (or why there is none)
        if state.phase == "map":
            st.info("The map is being made (UMAP 2D of the embeddings): it shows here when it is done.",
                    icon=":material/hourglass_top:")
            st.progress(1.0, text=f"{state.message} ({state.elapsed_s:.0f} s)")
        else:
            st.info("The map is made at the end of the ingestion running now: it shows here when it is done.",
                    icon=":material/hourglass_top:")
            ingest_panel.job_progress(state)

    progress()
    return True


def _no_map(status: ui.LakeStatus) -> None:
    st.info(f"The lake has no map yet. Make one from a terminal:\n\n"
            f"```\nimgrec project --lake {status.path}\n```\n\n(every map: `--features embedding color --method "
            "umap tsne pca --dims 2 3`; then `--evaluate` for the figures of *What the map shows*).")
    if status.size <= 50_000 and ui.is_admin():
        if st.button("Make the map now (UMAP 2D of the embeddings)", type="primary", icon=":material/scatter_plot:"):
            try:
                _make_map(status)
                st.rerun()
            except Exception as exc:  # a refused map, a stale index, ...
                log.exception("projection")
                st.error(f"Could not make the map: {exc}")
    else:
        st.caption(f"{status.size:,} images: run it from a terminal (progress bar, a few minutes).")


# --- the 2D map ---------------------------------------------------------------------------------------------------


def _colour_column(info: dict[str, Any], rows: np.ndarray, clusters: np.ndarray, by: str,
                   cluster_names: dict[int, str]) -> list[str]:
    """The category (or, for the mean colour, the #rrggbb) of each point."""
    import numpy as np

    from imgrec.projection import hex_colors

    if by == "cluster":
        return [f"{int(c):02d} {cluster_names.get(int(c), '')}"[:40] for c in clusters]
    if by == "mean":
        return hex_colors(info["rgb"][rows])
    values = info[by][rows]
    if by == "label":  # the 12 most frequent labels of the whole lake, the rest as "other"
        labels, counts = np.unique(info["label"], return_counts=True)
        top = set(labels[np.argsort(-counts)[:12]])
        return [v if v in top else "other" for v in values]
    return [str(v) for v in values]


def _color_encoding(by: str, values: list[str]) -> Any:
    import altair as alt

    if by == "mean":
        return alt.Color("colour:N", scale=None, legend=None)
    domain = sorted(set(values))
    return alt.Color("colour:N", title=COLOR_BY[by], scale=alt.Scale(domain=domain, range=CATEGORY20),
                     legend=alt.Legend(labelLimit=200, symbolLimit=60, labelFontSize=10, symbolSize=40,
                                       columns=1 if len(domain) <= 20 else 2))


def _point_rows(status: ui.LakeStatus, info: dict[str, Any], c: dict[str, Any], sel: np.ndarray, by: str,
                cluster_names: dict[int, str], thumbs: bool) -> list[dict[str, Any]]:
    import numpy as np

    rows = np.searchsorted(info["ids"], c["image_id"][sel])
    rows = np.clip(rows, 0, max(len(info["ids"]) - 1, 0))
    colours = _colour_column(info, rows, c["cluster"][sel], by, cluster_names)
    ids = [int(i) for i in c["image_id"][sel]]
    uris = _thumb_uris(str(status.path), status.snapshot, tuple(ids), status) if thumbs else {}
    out = []
    for j, i in enumerate(ids):
        r = int(rows[j])
        row = {"image_id": i, "x": float(c["x"][sel][j]), "y": float(c["y"][sel][j]), "colour": colours[j],
               "label": info["label"][r], "path": info["relpath"][r],
               "cluster": cluster_names.get(int(c["cluster"][sel][j]), str(int(c["cluster"][sel][j])))}
        if i in uris:
            row["image"] = uris[i]
        out.append(row)
    return out


def _map_chart(points: list[dict[str, Any]], cells: list[dict[str, Any]], by: str, extent: tuple[float, ...],
               height: int, select: bool) -> Any:
    import altair as alt

    x0, x1, y0, y1 = extent
    xs = alt.Scale(domain=[x0, x1], nice=False, zero=False)
    ys = alt.Scale(domain=[y0, y1], nice=False, zero=False)
    density = alt.Chart(alt.Data(values=cells)).mark_rect(opacity=0.55).encode(
        x=alt.X("x0:Q", scale=xs, title=None), x2="x1:Q", y=alt.Y("y0:Q", scale=ys, title=None), y2="y1:Q",
        color=alt.Color("count:Q", scale=alt.Scale(type="log", scheme="greys"), title="images per cell"),
        tooltip=[alt.Tooltip("count:Q", title="images in this cell")],
    )
    tooltip = ["image:N"] if points and "image" in points[0] else []
    tooltip += [alt.Tooltip("image_id:Q", title="id"), "path:N", "label:N", "cluster:N"]
    pts = alt.Chart(alt.Data(values=points)).mark_circle(size=22, opacity=0.85).encode(
        x=alt.X("x:Q", scale=xs), y=alt.Y("y:Q", scale=ys),
        color=_color_encoding(by, [p["colour"] for p in points]), tooltip=tooltip,
    )
    if select:
        pts = pts.add_params(alt.selection_interval(name="region", encodings=["x", "y"]),
                             alt.selection_point(name="pick", fields=["image_id"], on="click"))
    return (alt.layer(density, pts).resolve_scale(color="independent")
            .properties(height=height).configure_view(strokeWidth=0))


def _selected(event: Any) -> tuple[dict[str, list[float]] | None, int | None]:
    """The region (x and y ranges) and the clicked image id of a chart's selection event."""
    sel = getattr(event, "selection", None) or (event.get("selection") if isinstance(event, dict) else None) or {}
    region = sel.get("region") or None
    if region and not ({"x", "y"} <= set(region)):
        region = None
    pick = sel.get("pick") or []
    picked = int(pick[0]["image_id"]) if pick and "image_id" in pick[0] else None
    return region, picked


def _image_card(status: ui.LakeStatus, info: dict[str, Any], image_id: int, key: str, width: int = 160) -> None:
    import numpy as np

    r = int(np.searchsorted(info["ids"], image_id))
    path = info["relpath"][r] if r < len(info["ids"]) and info["ids"][r] == image_id else ""
    thumb = status.engine.thumbnails([image_id]).get(image_id) if status.engine else None
    if thumb:
        st.image(thumb, width=width)
    label = info["label"][r] if path else ""
    st.caption(f"#{image_id} · {path.rsplit('/', 1)[-1]}" + (f" ({label})" if label else ""), help=path or None)
    if st.button("Search", key=key, icon=":material/image_search:", help="open this image in the Search page"):
        _open_in_search(image_id, f"#{image_id} · {path}" + (f" ({label})" if label else ""))


def _grid(status: ui.LakeStatus, info: dict[str, Any], ids: list[int], prefix: str, columns: int = 6) -> None:
    cols = st.columns(columns)
    for j, i in enumerate(ids):
        with cols[j % columns]:
            _image_card(status, info, i, f"{prefix}_{i}", width=120)


def _view_2d(status: ui.LakeStatus, maps: Maps, key: str, info: dict[str, Any], by: str, n_points: int) -> None:
    import numpy as np

    from imgrec.projection import density

    meta = maps.meta[key]
    c = maps.coords(key)
    names = {int(s["cluster"]): s["label"] for s in meta.get("clusters", [])}
    full = (float(c["x"].min()), float(c["x"].max()), float(c["y"].min()), float(c["y"].max()))
    zkey = f"explorer_zoom_{key}"
    zoom = st.session_state.get(zkey) or full
    inside = (c["x"] >= zoom[0]) & (c["x"] <= zoom[1]) & (c["y"] >= zoom[2]) & (c["y"] <= zoom[3])
    where = np.flatnonzero(inside)
    rng = np.random.default_rng(0)
    sel = np.sort(rng.choice(where, size=min(n_points, len(where)), replace=False)) if len(where) else where
    thumbs = len(sel) <= THUMB_POINTS
    points = _point_rows(status, info, c, sel, by, names, thumbs)
    cells = density(c["x"][where], c["y"][where], bins=70, extent=zoom) if len(where) else []
    zoomed = zoom != full
    st.caption(f"{len(where):,} images in view (grey cells: how many per cell), {len(sel):,} of them drawn as points"
               + (" with their thumbnail on hover" if thumbs else f" (hover thumbnails up to {THUMB_POINTS:,} points)")
               + ". Drag to select a region, click a point to pick an image.")
    event = st.altair_chart(_map_chart(points, cells, by, zoom, 620, True), width="stretch", on_select="rerun",
                            key=f"explorer_chart_{key}_{by}_{n_points}_{zoom}")
    region, picked = _selected(event)
    bcols = st.columns(4)
    if region and bcols[0].button("Zoom to the selected region", icon=":material/zoom_in:"):
        st.session_state[zkey] = (min(region["x"]), max(region["x"]), min(region["y"]), max(region["y"]))
        st.rerun()
    if zoomed and bcols[1].button("Show the whole map", icon=":material/zoom_out_map:"):
        st.session_state.pop(zkey, None)
        st.rerun()
    if picked is not None:
        st.markdown("**Picked image**")
        _image_card(status, info, picked, "explorer_open_picked", width=220)
    if region:
        rx, ry = sorted(region["x"]), sorted(region["y"])
        hit = np.flatnonzero((c["x"] >= rx[0]) & (c["x"] <= rx[1]) & (c["y"] >= ry[0]) & (c["y"] <= ry[1]))
        show = np.sort(rng.choice(hit, size=min(REGION_IMAGES, len(hit)), replace=False)) if len(hit) else hit
        st.markdown(f"**The selected region: {len(hit):,} images**" + (
            f" ({len(show)} of them at random)" if len(hit) > len(show) else ""))
        if len(hit):
            clusters, counts = np.unique(c["cluster"][hit], return_counts=True)
            top = np.argsort(-counts)[:3]
            st.caption("Clusters: " + " · ".join(f"{names.get(int(clusters[t]), clusters[t])} "
                                                f"{counts[t] / len(hit):.0%}" for t in top))
            _grid(status, info, [int(i) for i in c["image_id"][show]], "explorer_region")


# --- 3D -----------------------------------------------------------------------------------------------------------


def _rgb_of(values: list[str], by: str) -> list[list[int]]:
    if by == "mean":
        return [[int(v[1:3], 16), int(v[3:5], 16), int(v[5:7], 16)] for v in values]
    domain = {v: i for i, v in enumerate(sorted(set(values)))}
    pal = [CATEGORY20[domain[v] % len(CATEGORY20)] for v in values]
    return [[int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)] for h in pal]


def _cloud(points: list[dict[str, Any]], target: list[float], zoom: float, key: str, tooltip: str) -> None:
    import pydeck as pdk

    layer = pdk.Layer("PointCloudLayer", data=points, get_position="position", get_color="rgb", point_size=3,
                      pickable=True, id="points")
    view = pdk.View(type="OrbitView", controller=True)
    state = pdk.ViewState(target=target, rotation_orbit=30, rotation_x=20, zoom=zoom)
    st.pydeck_chart(pdk.Deck(layers=[layer], views=[view], initial_view_state=state, map_provider=None,
                             map_style=None, tooltip={"html": tooltip}), height=560, key=key)


def _view_3d(status: ui.LakeStatus, maps: Maps, key: str, info: dict[str, Any], by: str) -> None:
    import numpy as np

    meta = maps.meta[key]
    c = maps.coords(key)
    names = {int(s["cluster"]): s["label"] for s in meta.get("clusters", [])}
    n = len(c["image_id"])
    sel = np.sort(np.random.default_rng(0).choice(n, size=min(MAX_3D, n), replace=False))
    rows = np.clip(np.searchsorted(info["ids"], c["image_id"][sel]), 0, max(len(info["ids"]) - 1, 0))
    colours = _colour_column(info, rows, c["cluster"][sel], by, names)
    xyz = np.stack([c["x"][sel], c["y"][sel], c["z"][sel]], 1).astype(np.float64)
    centre = xyz.mean(0) if len(xyz) else np.zeros(3)
    span = float(np.ptp(xyz, axis=0).max()) if len(xyz) else 1.0
    xyz = (xyz - centre) / max(span, 1e-9) * 100.0  # a 100-unit cube around the origin
    points = [{"position": p.tolist(), "rgb": rgb, "id": int(i), "label": info["label"][r], "path": info["relpath"][r],
               "cluster": names.get(int(k), str(int(k)))}
              for p, rgb, i, r, k in zip(xyz, _rgb_of(colours, by), c["image_id"][sel], rows, c["cluster"][sel],
                                         strict=True)]
    st.caption(f"{len(sel):,} of {n:,} images (a fixed random sample); drag to turn, scroll to zoom; hover for the "
               "image's path and label.")
    _cloud(points, [0.0, 0.0, 0.0], 2.2, f"explorer_3d_{key}_{by}",
           "#{id} {path}<br/>{label}<br/>cluster: {cluster}")


def _colour_analysis(status: ui.LakeStatus, maps: Maps, key: str, info: dict[str, Any]) -> None:
    import numpy as np

    from imgrec.projection import density, hex_colors

    st.subheader("Colour")
    n = len(info["ids"])
    left, right = st.columns(2)
    with left:
        st.markdown("**Each image's mean colour in RGB space** (from its HSV histogram; drag to turn)")
        sel = np.sort(np.random.default_rng(1).choice(n, size=min(MAX_3D, n), replace=False))
        rgb = info["rgb"][sel]
        points = [{"position": [float(r) - 127.5, float(g) - 127.5, float(b) - 127.5], "rgb": [int(r), int(g), int(b)],
                   "id": int(i), "path": info["relpath"][j], "hex": h}
                  for (r, g, b), i, j, h in zip(rgb, info["ids"][sel], sel, hex_colors(rgb), strict=True)]
        _cloud(points, [0.0, 0.0, 0.0], 0.4, "explorer_rgb", "#{id} {path}<br/>mean colour {hex}")
    with right:
        m = maps.meta[key]
        other = "color" if m["features"] == "embedding" else "embedding"
        twins = [k for k in maps.keys if maps.meta[k]["features"] == other and maps.meta[k]["dims"] == 2]
        twins.sort(key=lambda k: (maps.meta[k]["method"] != m["method"], k))
        if not twins:
            st.caption(f"No 2D map of the {other} features yet: `imgrec project --lake {status.path} --features "
                       f"{other}` draws it here beside this one.")
            return
        k2 = twins[0]
        st.markdown(f"**The {'colour-histogram' if other == 'color' else 'embedding'} map** "
                    f"({METHOD_NAMES[maps.meta[k2]['method']]}), points in their mean colour")
        c = maps.coords(k2)
        ext = (float(c["x"].min()), float(c["x"].max()), float(c["y"].min()), float(c["y"].max()))
        sel = np.sort(np.random.default_rng(0).choice(len(c["x"]), size=min(3000, len(c["x"])), replace=False))
        names = {int(s["cluster"]): s["label"] for s in maps.meta[k2].get("clusters", [])}
        pts = _point_rows(status, info, c, sel, "mean", names, False)
        st.altair_chart(_map_chart(pts, density(c["x"], c["y"], 60, ext), "mean", ext, 520, False), width="stretch")


# --- clusters and figures -------------------------------------------------------------------------------------------


def _clusters(status: ui.LakeStatus, meta: dict[str, Any]) -> None:
    clusters = sorted(meta.get("clusters", []), key=lambda s: -s["size"])
    if not clusters:
        return
    st.subheader(f"Clusters ({len(clusters)}, k-means on the {meta['features']} features reduced by PCA)")
    st.caption("Each cluster's label is its most frequent predicted labels; the images are the closest to its centre.")
    assert status.engine is not None
    thumbs = status.engine.thumbnails([i for s in clusters for i in s["representatives"]])
    for s in clusters:
        cols = st.columns([2, 6])
        folders = ", ".join(f"{f['folder']} {f['share']:.0%}" for f in s.get("folders", []))
        labels = ", ".join(f"{lab['label']} {lab['share']:.0%}" for lab in s.get("labels", []))
        cols[0].markdown(f"**{s['cluster']:02d} · {s['label']}**  \n{s['size']:,} images  \n{labels}  \n"
                         f"folders: {folders}")
        centre = int(s["representatives"][0])
        if cols[0].button(f"Search like #{centre}", key=f"explorer_cluster_{s['cluster']}",
                          icon=":material/image_search:", help="the image closest to the cluster's centre"):
            _open_in_search(centre, f"#{centre} (centre of cluster {s['cluster']:02d} · {s['label']})")
        with cols[1]:
            inner = st.columns(6)
            for j, i in enumerate(s["representatives"][:6]):
                if i in thumbs:
                    inner[j].image(thumbs[i], width="stretch")


def _figures(status: ui.LakeStatus, maps: Maps) -> None:
    st.subheader("What the map shows")
    ev = _evaluation(status.path)
    timing_rows = [{"map": k, "images": m["count"], "fitted on": m["fitted_on"],
                    **{f"{s} s": round(v, 1) for s, v in m.get("timings", {}).items()}}
                   for k, m in sorted(maps.meta.items())]
    if ev is None:
        st.caption(f"No evaluation yet: `imgrec project --lake {status.path} --features embedding color --method umap "
                   "tsne pca --evaluate` measures every map on the labelled sets found in the collections "
                   "(a labels.csv with path, class_id).")
    else:
        k = ev["k"]
        st.markdown(
            f"Measured on the labelled sets of this lake ({ev['created_at'][:16].replace('T', ' ')}). **Neighbours "
            f"kept @{k}**: the share of each image's {k} nearest neighbours in the full feature space that are "
            f"also among its {k} nearest on the map (1 = every neighbourhood kept). **Silhouette**: how well the "
            "labelled classes separate (1 = tight and apart, 0 = overlapping); the full space's silhouette is the "
            "reference. **Cluster purity**: share of images whose cluster's majority class is their class.")
        rows = [{"set": s["name"], "map": m["key"], f"neighbours kept @{k}": m["np_at_k"],
                 "silhouette (map)": m["silhouette"], "silhouette (full space)": s["full_silhouette"][m["features"]],
                 "cluster purity": m["cluster_purity"]} for s in ev["sets"] for m in s["maps"] if m["dims"] == 2]
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")
        if ev.get("global"):
            st.caption("Whole lake, neighbours kept @" + f"{k} ({ev['global'][0]['queries']} random queries): "
                       + " · ".join(f"{g['key']} {g['np_at_k']:.3f}" for g in ev["global"]))
        st.markdown(
            "- The **embedding** maps put images of the same kind together: classes separate on the map at least "
            "as well as in the full space (UMAP and t-SNE pull them into islands), and the clusters read as "
            "content (cats, dogs, flowers, buses, ...).\n"
            "- **UMAP and t-SNE keep local neighbourhoods** far better than PCA, which keeps only the two main "
            "directions; distances *between* islands are not meaningful on UMAP / t-SNE maps.\n"
            "- The **colour** maps order images by palette (dark to bright, warm to cool), not by content: labelled "
            "classes overlap there, except for classes with a typical colour.\n"
            "- Details and caveats: `docs/analysis.md`.")
    st.markdown("**How each map was made** (seconds per stage, this machine)")
    st.dataframe(timing_rows, hide_index=True, width="stretch")


# --- the page -------------------------------------------------------------------------------------------------------


def _title(maps: Maps, key: str) -> str:
    m = maps.meta[key]
    return f"{m['features']} · {METHOD_NAMES.get(m['method'], m['method'])} · {m['dims']}D"


def main(status: ui.LakeStatus) -> None:
    st.title("Explorer")
    st.caption("Every image on one map: similar images lie close together (PCA, then UMAP or t-SNE, of the deep "
               "embeddings or of the colour histograms).")
    if status.error:
        st.error(status.error)
        return
    if status.size == 0 or status.engine is None or status.engine.index is None:
        if not _map_coming(status):
            ui.empty_lake_message(status)
        return
    from imgrec.projection import table_path

    lake = str(status.path)
    try:
        maps = _maps(lake, _stamp(table_path(status.path)))
    except Exception as exc:  # an unreadable projections file
        log.exception("projections")
        st.error(f"Cannot read the map of {lake}: {exc}. Make it again with `imgrec project --lake {lake} --refit`.")
        return
    if maps is None or not maps.meta:
        if not _map_coming(status):
            _no_map(status)
        return
    info = _image_info(lake, status.snapshot, status)
    keys = sorted(maps.keys, key=lambda k: (maps.meta[k]["features"] != "embedding", maps.meta[k]["dims"],
                                            list(METHOD_NAMES).index(maps.meta[k]["method"])))
    c1, c2, c3 = st.columns([3, 3, 2])
    key = c1.selectbox("Map", keys, format_func=lambda k: _title(maps, k), key="explorer_map")
    by = c2.radio("Colour by", list(COLOR_BY), format_func=COLOR_BY.get, horizontal=True, key="explorer_by")
    n_points = c3.slider("Points drawn", 500, MAX_POINTS, 2000, step=500, key="explorer_points",
                         help=f"A random sample of the images in view; thumbnails on hover up to {THUMB_POINTS:,}.")
    meta = maps.meta[key]
    missing = len(info["ids"]) - meta["count"]
    if meta["snapshot"] != status.snapshot or missing:
        st.warning(f"This map covers snapshot {meta['snapshot']} ({meta['count']:,} images); the lake is at "
                   f"snapshot {status.snapshot} ({len(info['ids']):,} images). `imgrec project --lake {lake}` "
                   "places the new images with the fitted model (and drops removed ones).")
    st.caption(f"{meta['count']:,} images · fitted on {meta['fitted_on']:,} (the rest placed by transform) · "
               f"{len(meta.get('clusters', []))} clusters · made {meta['created_at'].replace('T', ' ')}")
    if meta["dims"] == 3:
        _view_3d(status, maps, key, info, by)
    else:
        _view_2d(status, maps, key, info, by, n_points)
        threes = [k for k in keys if maps.meta[k]["dims"] == 3 and maps.meta[k]["features"] == meta["features"]]
        if threes:
            with st.expander(f"3D view ({_title(maps, threes[0])})"):
                _view_3d(status, maps, threes[0], info, by)
    _colour_analysis(status, maps, key, info)
    _clusters(status, meta)
    _figures(status, maps)


st.set_page_config(page_title="imgrec · Explorer", page_icon=":material/scatter_plot:", layout="wide")
main(ui.sidebar())
