"""The imgrec app: `streamlit run app.py`; this file is the home page, the other pages are in pages/ (listed in the
sidebar by Streamlit). The lake: the sidebar's field, else $IMGREC_LAKE, else data/lake, the same for every page.
"""

from __future__ import annotations

import streamlit as st

from imgrec import ui


def home(status: ui.LakeStatus) -> None:
    st.title("imgrec")
    st.caption("Content-based image search: colour histograms, perceptual hashes, deep embeddings, or all three mixed.")
    if status.error:
        st.error(status.error)
        return
    if status.size == 0:
        ui.empty_lake_message(status)
        st.page_link("pages/2_Collection.py", label="Ingest a first folder from the Collection page",
                     icon=":material/create_new_folder:")
        return

    engine = status.engine
    assert engine is not None
    manifest = engine.conn.manifest if engine.conn is not None else None
    cur = engine.cursor()
    collections = cur.execute(
        "SELECT collection, any_value(root) AS root, count(*) AS images, round(sum(size_bytes) / 1e6, 1) AS mb "
        "FROM images JOIN collections USING (collection) GROUP BY collection ORDER BY collection").fetchall()
    skipped = int(cur.execute("SELECT count(*) FROM skipped").fetchone()[0])

    cols = st.columns(4)
    cols[0].metric("Images", f"{status.size:,}")
    cols[1].metric("Collections", len(collections))
    cols[2].metric("Snapshot", status.snapshot)
    cols[3].metric("Unreadable files", skipped, help="files found but not ingested (see `imgrec stats`)")
    if manifest is not None:
        st.caption(f"Lake `{status.path}` · model {manifest.model.get('name', '?')} · "
                   f"updated {manifest.updated_at[:19].replace('T', ' ')} UTC")
    if status.note:
        st.info(status.note)
    st.page_link("pages/1_Search.py", label="Search the collection", icon=":material/image_search:")

    st.subheader("Collections")
    st.dataframe(
        [{"collection": c, "folder": root, "images": n, "MB": mb} for c, root, n, mb in collections],
        hide_index=True, width="stretch",
    )
    st.subheader("Add images")
    st.page_link("pages/2_Collection.py", label="Add a folder from the Collection page (progress, stop, resume)",
                 icon=":material/photo_library:")
    st.caption("Or from a terminal (walked recursively; running it again only adds what changed):")
    st.code(ui.ingest_command(status.path), language="bash")


st.set_page_config(page_title="imgrec", page_icon=":material/image_search:", layout="wide")
home(ui.sidebar())
