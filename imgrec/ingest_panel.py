"""The app's folder form: a folder of this machine, Start, the progress of the background ingestion (images done,
images/s, time left), Stop, and its outcome. The Search page shows it on an empty lake, the Collection page always.
Session state and widget keys are the same on both pages, so a job started on one is followed on the other."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import streamlit as st

from imgrec import ui

if TYPE_CHECKING:
    from imgrec.jobs import JobState

log = logging.getLogger("imgrec.app")

FOLDER_KEY = "collection_folder"
START_ERROR_KEY = "collection_start_error"  # (lake, message) of the last Start that could not start
SEEN_KEY = "collection_seen_job"  # id of the finished job this session already reloaded for


def _start(lake: str) -> None:
    from imgrec import access, jobs

    st.session_state.pop(START_ERROR_KEY, None)
    try:
        ui.require_admin("ingest")
        jobs.start(st.session_state.get(FOLDER_KEY, ""), lake)
    except (jobs.JobError, access.Forbidden) as exc:
        st.session_state[START_ERROR_KEY] = (lake, str(exc))
    except Exception as exc:  # never a traceback on the page
        log.exception("cannot start an ingestion")
        st.session_state[START_ERROR_KEY] = (lake, f"cannot start the ingestion ({type(exc).__name__}: {exc})")


def _stop(lake: str) -> None:
    from imgrec import jobs

    ui.require_admin("stop_ingest")
    jobs.stop(lake)


def _dismiss(lake: str) -> None:
    from imgrec import jobs

    ui.require_admin("stop_ingest")
    jobs.dismiss(lake)


def job_progress(state: JobState) -> None:
    """A progress bar: files done of the total, images/s, time left (or the scan, or the finishing steps)."""
    if state.phase == "map":
        st.progress(1.0, text=f"{state.done:,} files ingested · making the map for the Explorer… "
                              f"({state.elapsed_s:.0f} s)")
    elif state.total is None:
        st.progress(0.0, text=f"Scanning `{state.folder}`… ({state.elapsed_s:.0f} s)")
    elif state.total and state.done >= state.total and state.status != "stopping":
        st.progress(1.0, text=f"{state.done:,} / {state.total:,} files · finishing: the last embeddings, the "
                              f"commit, the search index… ({state.elapsed_s:.0f} s)")
    else:
        rate = f" · {state.images_per_s:.1f} images/s" if state.images_per_s else ""
        eta = ""
        if state.images_per_s and state.total:
            eta = f" · about {max(0, state.total - state.done) / state.images_per_s:.0f} s left"
        st.progress(state.fraction, text=f"{state.done:,} / {state.total:,} files{rate}{eta} "
                                         f"({state.elapsed_s:.0f} s)")
    st.caption(f"Ingesting `{state.folder}`" + (f" · {state.message}" if state.message else ""))


def _job_outcome(state: JobState, status: ui.LakeStatus) -> None:
    report = state.report or {}
    if state.status == "done":
        snap = report.get("snapshot", -1)
        served = "the page shows it now" if status.snapshot >= snap else "it is picked up at the next interaction"
        processed = int(report.get("processed", 0))
        rate = f", {processed / state.elapsed_s:.1f} images/s overall" if processed and state.elapsed_s else ""
        changed = processed or report.get("relinked") or report.get("removed") or report.get("skipped")
        outcome = f"New snapshot {snap}: {served}." if changed else f"Nothing changed: the lake stays at snapshot {snap}."
        st.success(f"Done: {processed:,} images ingested from `{state.folder}` in {state.elapsed_s:.0f} s{rate}; "
                   f"{report.get('unchanged', 0):,} unchanged, {report.get('skipped', 0):,} unreadable. {outcome}")
    elif state.status == "stopped":
        st.warning(f"Stopped: {report.get('processed', state.done):,} images of `{state.folder}` were committed. "
                   "Start the same folder again to resume where it stopped; the search index (and so this page) "
                   "is brought up to date when a run completes.")
    else:
        st.error(f"The ingestion of `{state.folder}` failed: {state.error or 'unknown error'}")
        if state.log:
            with st.expander("Log"):
                st.code("\n".join(state.log[-20:]), language=None)


def job_running(status: ui.LakeStatus) -> bool:
    """Whether an ingestion into this lake runs now (started from the app, by any session)."""
    from imgrec import jobs

    job = jobs.current(str(status.path))
    return job is not None and job.running


def panel(status: ui.LakeStatus, *, rerun_when_searchable: bool = False) -> None:
    """The folder field, Start, and the progress of this lake's job (refreshed every second while it runs);
    ``rerun_when_searchable``: the whole page again as soon as the lake's first images are searchable (an empty
    lake's Search page then shows the uploader while the run goes on)."""
    from imgrec import jobs

    lake = str(status.path)
    if not ui.is_admin():
        st.caption("Adding folders to the lake is for the admin of this shared server (sign in from the sidebar).")
        return
    job = jobs.current(lake)
    running = job is not None and job.running
    if job is not None and not st.session_state.get(FOLDER_KEY):  # back on the page: the job's folder, to resume
        st.session_state[FOLDER_KEY] = job.folder
    with st.container(border=True):
        st.markdown("**Add images** · a folder on this machine, walked recursively; running it again only adds what "
                    "changed, and a stopped run resumes.")
        c1, c2 = st.columns([5, 1], vertical_alignment="bottom")
        c1.text_input("Folder of images", key=FOLDER_KEY, placeholder="/path/to/photos",
                      label_visibility="collapsed")
        c2.button("Start", type="primary", icon=":material/play_arrow:", on_click=_start, args=(lake,),
                  disabled=running, width="stretch", key="collection_start")
        err = st.session_state.get(START_ERROR_KEY)
        if err and err[0] == lake and not running:
            st.error(f"Cannot start: {err[1]}")
        st.caption(f"The same as `{ui.ingest_command(status.path).replace('FOLDER', '<folder>')}`, in the "
                   "background: other pages stay usable.")

        @st.fragment(run_every=1.0 if running else None)
        def progress() -> None:
            current = jobs.current(lake)
            if current is None:
                return
            state = current.state()
            if state.running and rerun_when_searchable and status.size == 0 and \
                    ui.indexed_snapshot(status.path) is not None:
                st.rerun()  # the first images are searchable: the page's search opens
            if state.running:
                job_progress(state)
                st.button("Stop", icon=":material/stop:", on_click=_stop, args=(lake,), key="collection_stop",
                          help="finish the image in hand, commit, stop (press again to stop at once)")
                return
            if running and st.session_state.get(SEEN_KEY) != state.id:
                st.session_state[SEEN_KEY] = state.id
                st.rerun()  # the whole page: the sidebar's engine moves to the new snapshot
            st.session_state[SEEN_KEY] = state.id
            _job_outcome(state, status)
            st.button("Dismiss", on_click=_dismiss, args=(lake,), key="collection_dismiss")

        progress()
