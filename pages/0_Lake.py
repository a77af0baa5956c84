"""The lake at a glance: its collections, counts and snapshot, and how to add images (the former home page; the
app now opens on Search)."""

from __future__ import annotations

import streamlit as st

from imgrec import ui

status = ui.page_start("Lake", ":material/database:", need_images=False)
if status.size == 0:
    ui.empty_lake_message(status)
    if ui.is_admin():
        st.page_link("pages/2_Collection.py", label="Ingest a first folder from the Collection page",
                     icon=":material/create_new_folder:")
    st.stop()

engine = status.engine
assert engine is not None
manifest = engine.manifest
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
admin = ui.is_admin()
if manifest is not None:
    where = f"Lake `{status.path}` · " if admin else ""
    st.caption(f"{where}model {manifest.model.get('name', '?')} · updated "
               f"{manifest.updated_at[:19].replace('T', ' ')} UTC")
if status.note:
    st.info(status.note)
st.page_link("pages/1_Search.py", label="Search the collection", icon=":material/image_search:")

st.subheader("Collections")
st.dataframe([{"collection": c, **({"folder": root} if admin else {}), "images": n, "MB": mb}
              for c, root, n, mb in collections], hide_index=True, width="stretch")
if admin:
    st.subheader("Add images")
    st.page_link("pages/2_Collection.py", label="Add a folder from the Collection page (progress, stop, resume)",
                 icon=":material/photo_library:")
    st.caption("Or from a terminal (walked recursively; running it again only adds what changed):")
    st.code(ui.ingest_command(status.path), language="bash")
