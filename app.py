"""The imgrec app: `streamlit run app.py`. It opens on Search, the job people come for; the other pages are in
pages/, listed once each in the sidebar by ``st.navigation`` (once it runs, Streamlit ignores the folder's own automatic
listing). The lake: the sidebar's field, else $IMGREC_LAKE, else data/lake, the same for every page.
"""

from __future__ import annotations

import streamlit as st

PAGES = [  # (file, title, icon); the first is where the app opens
    ("pages/1_Search.py", "Search", ":material/image_search:"),
    ("pages/2_Collection.py", "Collection", ":material/photo_library:"),
    ("pages/6_Join.py", "Join", ":material/join_inner:"),
    ("pages/4_Explorer.py", "Explorer", ":material/scatter_plot:"),
    ("pages/5_Quality.py", "Quality", ":material/fact_check:"),
    ("pages/3_Profiling.py", "Profiling", ":material/speed:"),
    ("pages/0_Lake.py", "Lake", ":material/database:"),
]

st.set_page_config(page_title="imgrec", page_icon=":material/image_search:", layout="wide")
st.navigation([st.Page(path, title=title, icon=icon, default=i == 0) for i, (path, title, icon) in enumerate(PAGES)]
              ).run()
