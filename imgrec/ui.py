"""Shared pieces of the Streamlit pages: which lake, its engine (one per lake per process), the sidebar, and the
pure helpers that turn what a person uploaded or picked into a search.

Only streamlit is imported here at module level; the engine and its dependencies (numpy, DuckDB, torch) are imported
inside the functions that need them, so a page that has nothing to show yet starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from imgrec.config import MAX_QUERY_IMAGES

if TYPE_CHECKING:
    from imgrec.search import Engine, Query, SearchResponse

LAKE_KEY = "imgrec_lake"  # session-state key of the sidebar's lake field
ADMIN_KEY = "imgrec_admin"  # this session signed in as admin (shared mode)
PASSWORD_KEY = "imgrec_admin_password"  # the sign-in field (cleared once checked)
CHOSEN_KEY = "imgrec_lake_chosen"  # the lake chosen in this session; outlives page switches (widget state does not)
UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MEASURE_HELP = {
    "color": "colour histograms (HSV): same palette",
    "hash": "perceptual hashes: near-duplicates, crops, re-encodings",
    "embedding": "deep embedding (EfficientNet): same kind of content",
    "mix": "all three, normalised against chance and fused",
}


def ingest_command(lake: Path | str) -> str:
    return f"imgrec ingest FOLDER --lake {lake}"


# --- which lake ---------------------------------------------------------------------------------------------------


def default_lake() -> Path:
    """The lake of the configuration: ``$IMGREC_LAKE``, else ``data/lake`` (see ``imgrec.config.resolve_lake``)."""
    from imgrec.config import resolve_lake

    return resolve_lake()


def lake_path() -> Path:
    """The lake every page uses: the sidebar's value if the person typed one (and may: see ``is_admin``), else the
    configured default."""
    from imgrec.config import resolve_lake

    if not is_admin():  # a viewer's session state never picks the lake, whatever it holds
        return resolve_lake()
    chosen = st.session_state.get(CHOSEN_KEY)
    if isinstance(chosen, str) and chosen.strip():
        return resolve_lake(chosen.strip())
    return resolve_lake()


# --- who may do what -----------------------------------------------------------------------------------------------


def app_mode() -> str:
    """``private`` (listening on loopback only, the project's default) or ``shared`` (``IMGREC_MODE=shared``, or
    listening beyond loopback): see ``imgrec.access``."""
    from imgrec import access

    return access.mode(st.get_option("server.address"))


def admin_password() -> str | None:
    """The admin password: ``$IMGREC_ADMIN_PASSWORD``, else ``admin_password`` in Streamlit's secrets."""
    import os

    from imgrec import access

    if os.environ.get(access.PASSWORD_ENV):
        return os.environ[access.PASSWORD_ENV]
    try:
        value = st.secrets.get("admin_password")
    except Exception:  # no secrets file
        return None
    return str(value) if value else None


def is_admin() -> bool:
    """Whether this session may change the lake: always in private mode; in shared mode once signed in."""
    return app_mode() == "private" or bool(st.session_state.get(ADMIN_KEY))


def require_admin(action: str) -> None:
    """Refuse (``access.Forbidden``) an admin action in a viewer's session: checked where the action happens, so a
    request for it that the page did not offer is refused too."""
    from imgrec import access

    if not is_admin():
        raise access.Forbidden(f"only an admin can {access.describe(action)} on this shared server")


def _sign_in() -> None:
    import time

    from imgrec import access

    given = st.session_state.get(PASSWORD_KEY) or ""
    st.session_state[PASSWORD_KEY] = ""  # not kept in the session
    if access.same_secret(given, admin_password()):
        st.session_state[ADMIN_KEY] = True
    else:
        time.sleep(0.5)  # a slower guess; the comparison itself takes the same time either way
        st.session_state["imgrec_admin_refused"] = True


def _sign_out() -> None:
    st.session_state[ADMIN_KEY] = False


def admin_box() -> None:
    """Shared mode: sign in as admin (or out), in the sidebar."""
    if app_mode() != "shared":
        return
    if st.session_state.get(ADMIN_KEY):
        st.caption("Signed in as admin.")
        st.button("Sign out", on_click=_sign_out, key="imgrec_sign_out")
        return
    if admin_password() is None:
        st.caption("Shared server: search and browse. (No admin password is set, so nothing here changes the lake.)")
        return
    with st.expander("Admin", expanded=False):
        st.text_input("Admin password", type="password", key=PASSWORD_KEY, on_change=_sign_in,
                      help="unlocks the lake folder, ingestion and adding uploads for this session")
        if st.session_state.pop("imgrec_admin_refused", False):
            st.error("Wrong password.")


# --- the engine ---------------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Opening the lake…", max_entries=16)
def open_engine(lake: str) -> Engine:
    """One engine per lake path per process, shared by every session (thread-safe).

    A lake that does not exist yet opens as an empty engine (size 0); it is picked up by ``lake_status`` once
    something has been ingested. Opening a lake whose index is missing or stale builds the index once; later
    snapshots are only picked up when their index exists (see ``lake_status``), so that an ingestion in progress
    does not make the app rebuild the index at every commit.
    """
    import time

    t0 = time.perf_counter()
    from imgrec.config import Config
    from imgrec.search import Engine

    imports_ms = (time.perf_counter() - t0) * 1000.0  # numpy, DuckDB, usearch, polars: 0 once already imported
    engine = Engine(Config.load(lake))
    engine.startup_ms.setdefault("imports", round(imports_ms, 1))
    engine.auto_index = False  # later snapshots: only once their index exists (lake_status)
    engine.warm_up()  # the model loads in the background while the person picks query images
    return engine


@dataclass
class LakeStatus:
    path: Path
    engine: Engine | None = None
    error: str | None = None  # the lake cannot be opened (shown instead of any content)
    note: str | None = None  # something worth knowing (a newer snapshot waiting for its index)

    @property
    def exists(self) -> bool:
        from imgrec.lake import Lake

        try:
            return Lake(self.path).exists
        except OSError:
            return False

    @property
    def size(self) -> int:
        return self.engine.size if self.engine is not None else 0

    @property
    def snapshot(self) -> int:
        return self.engine.snapshot if self.engine is not None else -1


def indexed_snapshot(lake: Path) -> int | None:
    """The snapshot the lake's current search index covers (None if there is none)."""
    from imgrec.index import current_dir
    from imgrec.lake import Lake

    try:
        path = current_dir(Lake(lake))
        return int(json.loads((path / "meta.json").read_text())["snapshot"]) if path else None
    except (OSError, ValueError, KeyError):
        return None


def lake_status(lake: Path | None = None) -> LakeStatus:
    """The engine of ``lake`` (default: ``lake_path()``), moved to the lake's newest searchable snapshot."""
    from imgrec.index import StaleIndex

    lake = lake or lake_path()
    status = LakeStatus(lake)
    try:
        engine = open_engine(str(lake))
    except Exception as exc:  # LakeError, a corrupt manifest, a path that is a file, no permission, ...
        status.error = f"Cannot open the lake {lake}: {exc}"
        return status
    try:
        latest = engine.lake.snapshot()
        if latest != engine.snapshot:
            if latest >= 0 and indexed_snapshot(lake) != latest:
                raise StaleIndex(latest)
            engine.refresh(auto_index=False)
    except StaleIndex:  # keep serving the snapshot at hand
        status.note = (f"The lake has a newer snapshot whose search index is not built yet (an ingestion still "
                       f"running?); searching snapshot {engine.snapshot}. If no ingestion is running: "
                       f"`imgrec index --lake {lake}`.")
    except Exception as exc:
        status.error = f"Cannot read the lake {lake}: {exc}"
        return status
    status.engine = engine
    return status


# --- the sidebar --------------------------------------------------------------------------------------------------


def sidebar() -> LakeStatus:
    """The lake field and the lake's image count, in the sidebar; returns the lake's status."""
    if CHOSEN_KEY not in st.session_state:
        st.session_state[CHOSEN_KEY] = str(default_lake())
    st.session_state[LAKE_KEY] = st.session_state[CHOSEN_KEY]  # re-seed the field on every page

    def chosen() -> None:
        st.session_state[CHOSEN_KEY] = st.session_state[LAKE_KEY]

    with st.sidebar:
        if is_admin():
            st.text_input(
                "Lake folder", key=LAKE_KEY, on_change=chosen,
                help="The Parquet lake to search (default: $IMGREC_LAKE, else data/lake). Build or extend one with "
                     "`imgrec ingest FOLDER --lake DIR`.",
            )
        status = lake_status()
        if not is_admin():
            st.caption(f"Collection: {status.path.name}")
        if status.error:
            st.error(status.error)
        elif not status.exists:
            st.caption("No lake here yet.")
        else:
            st.metric("Images", f"{status.size:,}")
            st.caption(f"snapshot {status.snapshot}")
            if status.note:
                st.caption(status.note)
        admin_box()
    return status


def page_start(title: str, icon: str, *, need_images: bool = True) -> LakeStatus:
    """A page's opening: its config and title, the sidebar; stops the page with a message when the lake cannot be
    read or (with ``need_images``) has nothing to show yet."""
    st.set_page_config(page_title=f"{title} · imgrec", page_icon=icon, layout="wide")
    # less of Streamlit's empty band above the title: on a 1280x800 window the results come on the first screen
    st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")
    st.title(title)
    status = sidebar()
    if status.error:
        st.error(status.error)
        st.stop()
    if need_images and status.size == 0:
        empty_lake_message(status)
        st.stop()
    return status


def empty_lake_message(status: LakeStatus) -> None:
    """What to do when there is nothing to search."""
    where = "There is no lake at" if not status.exists else "The lake has no images yet:"
    st.info(f"{where} `{status.path}`. Add a folder of images (sub-folders included) with\n\n"
            f"```\n{ingest_command(status.path)}\n```\n\nthen reload this page. Or point the sidebar's "
            "*Lake folder* at an existing lake.")
    if status.note:
        st.info(status.note)


# --- queries ------------------------------------------------------------------------------------------------------


def make_queries(uploads: Sequence[tuple[str, bytes]] = (), picked: Sequence[int] = ()) -> list[Query]:
    """Query images from uploads (name, bytes) and picked image ids; QueryError unless there are 1 to 5."""
    from imgrec.search import Query, QueryError

    queries = [Query(data=bytes(data), name=name) for name, data in uploads]
    queries += [Query(image_id=int(i), name=f"id:{int(i)}") for i in picked]
    if not queries:
        raise QueryError(f"upload or pick 1 to {MAX_QUERY_IMAGES} query images first")
    if len(queries) > MAX_QUERY_IMAGES:
        raise QueryError(f"at most {MAX_QUERY_IMAGES} query images at a time: you gave {len(queries)} "
                         f"({len(uploads)} uploaded, {len(picked)} picked); remove {len(queries) - MAX_QUERY_IMAGES}")
    return queries


def run_search(engine: Engine, uploads: Sequence[tuple[str, bytes]] = (), picked: Sequence[int] = (),
               measure: str = "mix", k: int = 5, *, exclude_query: bool = False,
               negative_uploads: Sequence[tuple[str, bytes]] = (), negative_ids: Sequence[int] = (),
               **options: Any) -> SearchResponse:
    """Search for uploaded images and/or images of the lake, less like the negative ones (QueryError for anything
    a person must change). ``options`` go to ``Engine.search`` (distance, threshold, filters, weights, ...)."""
    from imgrec.search import Query, QueryError

    negatives = [Query(data=bytes(data), name=name) for name, data in negative_uploads]
    negatives += [Query(image_id=int(i), name=f"id:{int(i)}") for i in negative_ids]
    if len(negatives) > MAX_QUERY_IMAGES:
        raise QueryError(f"at most {MAX_QUERY_IMAGES} negative examples at a time: you gave {len(negatives)}")
    return engine.search(make_queries(uploads, picked), measure=measure, k=k, exclude_query=exclude_query,
                         negatives=negatives, **options)


UPLOADS_FOLDER = "uploads"  # <lake>/uploads: the collection of uploads a person chose to keep
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def save_uploads(lake: Path | str, uploads: Sequence[tuple[str, bytes]], max_bytes: int | None = None,
                 max_pixels: int = 180_000_000) -> tuple[Path, list[Path], list[str]]:
    """Keep uploads the person asked to add: write them into ``<lake>/uploads`` (a collection of its own).

    The file name never comes from the upload's path: its stem, stripped to letters, digits, ``-``, ``_`` and ``.``,
    then the first 16 hex digits of the content hash, then the suffix of the decoded format. The same bytes give the
    same name, so nothing is overwritten or kept twice. Only decodable images within the limits are written
    (atomically: a temporary name, then a rename). Returns (folder, files written or already there, problems).
    """
    import os
    import re
    import uuid

    from imgrec.features.extract import content_hash
    from imgrec.imaging import ImageError, decode

    folder = Path(lake) / UPLOADS_FOLDER
    saved: list[Path] = []
    problems: list[str] = []
    for name, data in uploads:
        shown = Path(name.replace("\\", "/")).name or "upload"
        if max_bytes is not None and len(data) > max_bytes:
            problems.append(f"{shown}: {len(data) / 1e6:.0f} MB is over the limit of {max_bytes / 1e6:.0f} MB")
            continue
        try:
            fmt = decode(data, max_pixels=max_pixels, min_side=64).format
        except ImageError as exc:
            problems.append(f"{shown}: {exc}")
            continue
        stem = re.sub(r"[^\w.-]+", "_", Path(shown).stem).strip("._-")[:60] or "upload"
        digest = content_hash(data)[:16]
        kept = next(folder.glob(f"*-{digest}.*"), None) if folder.is_dir() else None  # these bytes, kept before
        path = kept or folder / f"{stem}-{digest}{_SUFFIX.get(fmt, '.img')}"
        if kept is None:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        saved.append(path)
    return folder, saved, problems


def query_thumbnail(data: bytes, size: int = 256) -> bytes | None:
    """A small JPEG of an uploaded image for showing it next to the results; None if it cannot be decoded."""
    from imgrec.imaging import ImageError, decode, thumbnail_jpeg

    try:
        return thumbnail_jpeg(decode(data, min_side=size).image, size)
    except ImageError:
        return None


def format_scores(scores: dict[str, float]) -> str:
    """Per-measure scores, embedding first."""
    order = {"embedding": 0, "color": 1, "hash": 2}
    return " · ".join(f"{m} {scores[m]:.3f}" for m in sorted(scores, key=lambda m: (order.get(m, 9), m)))


def format_ranks(ranks: dict[str, int]) -> str:
    """Rank under each single measure, embedding first."""
    order = {"embedding": 0, "color": 1, "hash": 2}
    return " · ".join(f"{m} #{ranks[m]}" for m in sorted(ranks, key=lambda m: (order.get(m, 9), m)))


MEASURE_COLORS = {"embedding": "#4c78a8", "color": "#f58518", "hash": "#54a24b"}


def contribution_bar(score: float, contributions: dict[str, float], measure: str) -> str:
    """A small HTML bar: the score's length, split into what each measure contributed (mix), else one colour."""
    parts = contributions or {measure: score}
    cells = "".join(
        f'<div title="{m}: {v:.3f}" style="width:{max(v, 0.0) * 100:.1f}%;background:{MEASURE_COLORS.get(m, "#888")}">'
        "</div>" for m, v in parts.items())
    return ('<div style="display:flex;height:6px;width:100%;background:#eee;border-radius:3px;overflow:hidden">'
            f"{cells}</div>")


def swatches(colors: Sequence[tuple[str, float]], height: int = 18) -> str:
    """An HTML strip of colour swatches, each as wide as its share."""
    cells = "".join(f'<div title="{c} {w:.0%}" style="flex:{max(w, 0.02):.3f};background:{c}"></div>'
                    for c, w in colors)
    return (f'<div style="display:flex;height:{height}px;width:100%;border:1px solid #ddd;border-radius:3px;'
            f'overflow:hidden">{cells}</div>')


def format_timings(timings_ms: dict[str, float]) -> str:
    return " · ".join(f"{stage} {ms:.1f} ms" for stage, ms in timings_ms.items() if stage != "total")
