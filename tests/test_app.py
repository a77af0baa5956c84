"""The Streamlit app, driven headless with streamlit.testing (AppTest) against real lakes: a missing one and a small
one ingested from synthetic images. No mocks: searches go through the real engine and model."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import app_pages, ingest_quietly
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Button

from imgrec.config import Config

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
SEARCH = ROOT / "pages" / "1_Search.py"
TIMEOUT = 60  # seconds per script run (the first upload search loads the embedding model)
RESULT = re.compile(r"^\*\*#(\d+) · (\d\.\d{3})\*\*$")


def _synthetic_images(folder: Path) -> dict[str, bytes]:
    """12 small, clearly different pictures: solid colours, gradients, shapes; JPEG and PNG."""
    folder.mkdir(parents=True)
    size = 96
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    pictures: dict[str, Image.Image] = {}
    for name, rgb in {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)
                      }.items():
        pictures[f"solid/{name}.png"] = Image.new("RGB", (size, size), rgb)
    ramps = {
        "grey": np.stack([xx, xx, xx], -1),
        "sunset": np.stack([np.ones_like(yy), 0.6 * (1 - yy), 0.3 * yy], -1),
        "sea": np.stack([0.1 * xx, 0.5 * yy, 0.6 + 0.4 * xx], -1),
        "diagonal": np.stack([(xx + yy) / 2, 1 - xx, yy], -1),
    }
    for name, arr in ramps.items():
        pictures[f"gradient/{name}.jpg"] = Image.fromarray((arr * 255).clip(0, 255).astype(np.uint8))
    for name, (bg, fg, shape) in {
        "circle": ((255, 255, 255), (200, 20, 20), "ellipse"),
        "square": ((20, 20, 20), (240, 240, 240), "rectangle"),
        "stripes": ((250, 200, 0), (0, 0, 120), "stripes"),
        "checker": ((255, 255, 255), (0, 0, 0), "checker"),
    }.items():
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        if shape == "ellipse":
            draw.ellipse((16, 16, 80, 80), fill=fg)
        elif shape == "rectangle":
            draw.rectangle((24, 24, 72, 72), fill=fg)
        elif shape == "stripes":
            for x in range(0, size, 16):
                draw.rectangle((x, 0, x + 7, size), fill=fg)
        else:
            for i in range(0, size, 24):
                for j in range(0, size, 24):
                    if (i + j) // 24 % 2 == 0:
                        draw.rectangle((i, j, i + 23, j + 23), fill=fg)
        pictures[f"shapes/{name}.jpg"] = img
    out = {}
    for rel, img in pictures.items():
        path = folder / rel
        path.parent.mkdir(exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if rel.endswith(".png") else "JPEG", quality=92)
        path.write_bytes(buf.getvalue())
        out[rel] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A lake of the 12 synthetic images (and the images' bytes by relative path)."""

    base = tmp_path_factory.mktemp("applake")
    images = _synthetic_images(base / "pictures")
    lake = base / "lake"
    report = ingest_quietly(base / "pictures", lake)
    assert report.processed == len(images) and report.skipped == 0
    return lake, images


@pytest.fixture
def missing_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lake = tmp_path / "no-lake-here"
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    return lake


@pytest.fixture
def filled_lake(filled: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMGREC_LAKE", str(filled[0]))
    return filled[0]


def search_page() -> AppTest:
    """The app as a browser opens it, then its Search page (from the sidebar's page list)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    return at.switch_page("pages/1_Search.py").run()


def texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "warning", "subheader")
                     for e in getattr(at, kind))


def results(at: AppTest) -> list[tuple[int, float]]:
    """(rank, score) of every result card shown."""
    return [(int(m[1]), float(m[2])) for e in at.markdown if (m := RESULT.match(str(e.value)))]


def result_keys(at: AppTest) -> list[str]:
    """Keys of the result cards' "More like this" buttons (more_<image id>), in rank order."""
    return [b.key for b in at.button if (b.key or "").startswith("more_")]


def image_id(lake: Path, relpath: str) -> int:
    from imgrec import ui

    engine = ui.open_engine(str(lake))
    return int(engine.cursor().execute("SELECT image_id FROM images WHERE relpath = ?", [relpath]).fetchone()[0])


def button(at: AppTest, label: str) -> Button:
    return next(b for b in at.button if b.label == label)


def pick(at: AppTest, n: int = 1) -> list[int]:
    """Select the first ``n`` images of the sample in the multiselect; returns their ids."""
    ms = at.multiselect(key="picked")
    ids = [int(opt.split(" ")[0].lstrip("#")) for opt in ms.options[:n]]
    ms.set_value(ids)
    at.run()
    assert at.multiselect(key="picked").value == ids
    return ids


# --- a missing lake -----------------------------------------------------------------------------------------------


def lake_page() -> AppTest:
    """The app, then its Lake page (the lake at a glance)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    return at.switch_page("pages/0_Lake.py").run()


def test_the_app_opens_on_search_even_on_a_missing_lake(missing_lake: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert at.title[0].value == "Search"  # the job people come for
    info = " ".join(i.value for i in at.info)
    assert "There is no lake at" in info and "press **Start**" in info
    # the folder form itself, on the first page (the command-line route beside it)
    assert at.text_input(key="collection_folder") and [b.label for b in at.main.button] == ["Start"]
    assert any(f"imgrec ingest <folder> --lake {missing_lake}" in c.value for c in at.caption)
    assert at.sidebar.text_input(key="imgrec_lake").value == str(missing_lake)
    assert "No lake here yet." in [c.value for c in at.sidebar.caption]
    assert not missing_lake.exists()  # looking does not create anything


def test_search_page_on_a_missing_lake(missing_lake: Path) -> None:
    at = search_page()
    assert not at.exception
    assert at.title[0].value == "Search"
    assert any(f"There is no lake at `{missing_lake}`" in i.value for i in at.info)
    assert at.text_input(key="collection_folder")  # the folder form
    assert not at.file_uploader and not at.multiselect  # nothing to search: no query widgets
    assert len(at.sidebar.text_input) == 1  # drawn once per page
    # the page file also runs on its own (streamlit run pages/1_Search.py)
    alone = AppTest.from_file(SEARCH, default_timeout=TIMEOUT).run()
    assert not alone.exception and any("There is no lake at" in i.value for i in alone.info)
    assert alone.sidebar.text_input(key="imgrec_lake").value == str(missing_lake)


def test_lake_is_an_unreadable_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("hello")
    monkeypatch.setenv("IMGREC_LAKE", str(not_a_folder))
    at = search_page()
    assert not at.exception
    assert any("Cannot open the lake" in e.value for e in at.error)


# --- a filled lake ------------------------------------------------------------------------------------------------


def test_the_lake_page_shows_the_lake(filled_lake: Path) -> None:
    at = lake_page()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.main.metric}
    assert metrics["Images"] == "12" and metrics["Collections"] == "1"
    assert "12" in [m.value for m in at.sidebar.metric]
    assert any(f"imgrec ingest FOLDER --lake {filled_lake}" in c.value for c in at.code)


def test_pick_search_and_more_like_this(filled_lake: Path) -> None:
    at = search_page()
    assert not at.exception
    assert len(at.multiselect(key="picked").options) == 12  # the whole (small) lake is the sample
    assert button(at, "Search").disabled  # nothing chosen yet
    (query,) = pick(at)
    button(at, "Search").click().run()
    assert not at.exception and not at.error
    shown = results(at)
    assert [r for r, _ in shown] == [1, 2, 3, 4, 5]  # k defaults to 5
    assert all(0.0 <= s <= 1.0 for _, s in shown) and [s for _, s in shown] == sorted((s for _, s in shown),
                                                                                         reverse=True)
    page = texts(at)
    assert "**5 results** · mix (fused)" in page and re.search(r"query time \*\*\d+\.\d ms\*\*", page)
    assert "stages: " in page and "candidates" in page and "rerank" in page
    assert re.search(r"embedding \d\.\d{3} · color \d\.\d{3} · hash \d\.\d{3}", page)  # per-measure scores
    more = [b for b in at.button if (b.key or "").startswith("more_")]
    assert len(more) == 5 and f"more_{query}" not in {b.key for b in more}  # the query itself is left out

    target = int(more[0].key.removeprefix("more_"))
    more[0].click().run()
    assert not at.exception and not at.error
    assert at.main.subheader[-1].value == f"More like #{target}"
    assert [r for r, _ in results(at)] == [1, 2, 3, 4, 5]
    assert f"more_{target}" not in {b.key for b in at.button}  # exclude_query=True


def test_measure_and_k(filled_lake: Path) -> None:
    at = search_page()
    pick(at, 2)
    at.selectbox(key="measure").set_value("color")
    at.slider(key="k").set_value(8)
    at.checkbox(key="exclude_query").uncheck()
    at.run()
    button(at, "Search").click().run()
    assert not at.exception and not at.error
    assert [r for r, _ in results(at)] == list(range(1, 9))
    assert "**8 results** · color (layout)" in texts(at)  # the colour layout: the colour measure's default


def test_upload_search(filled_lake: Path, filled: tuple[Path, dict[str, bytes]]) -> None:
    _, images = filled
    at = search_page()
    at.file_uploader(key="uploads").upload("circle.jpg", images["shapes/circle.jpg"], "image/jpeg")
    at.run()
    button(at, "Search").click().run()
    assert not at.exception and not at.error
    assert at.main.subheader[-1].value == "Results for circle.jpg"
    assert [r for r, _ in results(at)] == [1, 2, 3, 4, 5]
    captions = [c for e in at.get("image") for c in e.captions]
    assert captions.count("circle.jpg") == 1  # the query, once, above the results (their header does not repeat it)
    # with the query left out (the default) its own file, found by its content hash, is not a result
    circle = f"more_{image_id(filled_lake, 'shapes/circle.jpg')}"
    assert circle not in result_keys(at)

    at.checkbox(key="exclude_query").uncheck()
    button(at, "Search").click().run()
    assert results(at)[0][1] == pytest.approx(1.0, abs=1e-3)  # now it finds itself first, at full score
    assert result_keys(at)[0] == circle


def test_broken_upload_is_a_clear_error(filled_lake: Path) -> None:
    at = search_page()
    at.file_uploader(key="uploads").upload("notes.jpg", b"this is not a picture", "image/jpeg")
    at.run()
    assert "notes.jpg (cannot be read)" in [c.value for c in at.caption]  # flagged before searching
    button(at, "Search").click().run()
    assert not at.exception
    (error,) = at.error
    assert "notes.jpg" in error.value and "not an image" in error.value
    assert not results(at)


def test_more_than_five_images_is_a_clear_error(filled_lake: Path, filled: tuple[Path, dict[str, bytes]]) -> None:
    _, images = filled
    at = search_page()
    pick(at, 2)
    uploader = at.file_uploader(key="uploads")
    for rel in list(images)[:4]:
        uploader.upload(Path(rel).name, images[rel], "image/png" if rel.endswith(".png") else "image/jpeg")
    at.run()
    assert not at.exception
    (error,) = at.error
    assert "At most 5 query images" in error.value and "you gave 6 (4 uploaded, 2 picked)" in error.value
    assert button(at, "Search").disabled


def test_sidebar_lake_overrides_the_environment(filled: tuple[Path, dict[str, bytes]], missing_lake: Path) -> None:
    at = lake_page()
    assert at.info  # $IMGREC_LAKE points at nothing
    at.sidebar.text_input(key="imgrec_lake").input(str(filled[0])).run()
    assert not at.exception and not at.info
    assert {m.label: m.value for m in at.main.metric}["Images"] == "12"
    at.switch_page("pages/1_Search.py").run()
    assert len(at.multiselect(key="picked").options) == 12  # the page uses the sidebar's lake too


def test_app_picks_up_a_lake_filled_while_it_runs(filled: tuple[Path, dict[str, bytes]], missing_lake: Path) -> None:
    from pipelines.index import build_indexes
    from pipelines.ingest import ingest

    at = lake_page()
    assert any("There is no lake at" in i.value for i in at.info)
    config = Config.load(missing_lake, workers=1)
    ingest([filled[0].parent / "pictures"], config, progress=False, build_index=False, log=lambda s: None)
    at.run()  # a new snapshot without its index (as while an ingestion runs): keep serving the old state, say so
    assert not at.exception
    assert any("search index is not built yet" in i.value for i in at.info)
    build_indexes(config)
    at.run()
    assert not at.exception and not at.info
    assert {m.label: m.value for m in at.main.metric}["Images"] == "12"


# --- the helpers behind the page (the same code path, without the UI) --------------------------------------------


def test_run_search_helper(filled: tuple[Path, dict[str, bytes]]) -> None:
    from imgrec import search, ui
    from imgrec.search import QueryError

    assert ui.MAX_QUERY_IMAGES == search.MAX_QUERY_IMAGES  # one limit, from imgrec.config

    lake, images = filled
    engine = ui.open_engine(str(lake))
    resp = ui.run_search(engine, [("sea.jpg", images["gradient/sea.jpg"])], [], "embedding", 3)
    assert [r.rank for r in resp.results] == [1, 2, 3]
    assert resp.results[0].relpath == "gradient/sea.jpg" and resp.results[0].score == pytest.approx(1.0, abs=1e-3)
    assert set(resp.timings_ms) >= {"decode", "features", "candidates", "rerank", "metadata", "total"}
    ids = [r.image_id for r in resp.results]
    resp = ui.run_search(engine, [], ids[:1], "hash", 4, exclude_query=True)
    assert len(resp.results) == 4 and ids[0] not in [r.image_id for r in resp.results]
    thumb = ui.query_thumbnail(images["solid/red.png"])
    assert thumb is not None and thumb[:2] == b"\xff\xd8"  # a JPEG
    assert ui.query_thumbnail(b"nope") is None
    with pytest.raises(QueryError, match="bad.png: corrupt or truncated image"):
        ui.run_search(engine, [("bad.png", images["solid/red.png"][:60])], [])
    with pytest.raises(QueryError, match="at most 5 query images"):
        ui.run_search(engine, [(n, b) for n, b in images.items()][:3], ids[:3])
    with pytest.raises(QueryError, match="upload or pick"):
        ui.run_search(engine, [], [])


# --- the search page's other ways in and out -------------------------------------------------------------------


def test_add_a_result_to_the_query_and_less_like_this(filled_lake: Path) -> None:
    at = search_page()
    (query,) = pick(at)
    button(at, "Search").click().run()
    first, second = [int(k.removeprefix("more_")) for k in result_keys(at)[:2]]
    at.button(key=f"add_{first}").click().run()
    assert not at.exception
    assert at.multiselect(key="picked").value == [query, first]  # now two query images
    at.button(key=f"less_{second}").click().run()
    assert "**Less like these** (1)" in texts(at)
    button(at, "Search").click().run()
    assert not at.exception and not at.error
    keys = result_keys(at)
    assert f"more_{second}" not in keys and f"more_{first}" not in keys and f"more_{query}" not in keys
    assert at.main.subheader[-1].value == f"Results for #{query}, #{first}"
    button(at, "Clear the negative examples").click().run()
    assert "Less like these" not in texts(at)


def test_browse_folders_and_find_by_name(filled_lake: Path) -> None:
    at = search_page()
    folder = at.selectbox(key="browse_folder")
    assert folder.options == [
        "pictures / gradient (4)", "pictures / shapes (4)", "pictures / solid (4)"]
    folder.set_value(1).run()
    adds = [b for b in at.button if (b.key or "").startswith("addf_")]
    assert len(adds) == 4
    target = int(adds[0].key.removeprefix("addf_"))
    adds[0].click().run()
    assert at.multiselect(key="picked").value == [target]
    assert at.button(key=f"addf_{target}").disabled  # already in the query
    at.text_input(key="find_name").input("sea").run()
    found = [b for b in at.button if (b.key or "").startswith("addn_")]
    assert len(found) == 1 and "1 image(s)" in texts(at)
    found[0].click().run()
    assert len(at.multiselect(key="picked").value) == 2
    button(at, "Search").click().run()
    assert not at.exception and [r for r, _ in results(at)] == [1, 2, 3, 4, 5]


def test_range_mode_filters_paging_and_weights(filled_lake: Path) -> None:
    at = search_page()
    pick(at)
    at.radio(key="mode").set_value("Range").run()
    at.slider(key="threshold").set_value(0.0).run()
    at.checkbox(key="exclude_query").uncheck().run()
    button(at, "Search").click().run()
    assert not at.exception and not at.error
    assert "every image scoring at least 0.00" in texts(at)
    at.selectbox(key="per_page").set_value(10).run()
    assert [r for r, _ in results(at)] == list(range(1, 11))  # page 1 of 2
    at.button(key="page_1").click().run()
    assert [r for r, _ in results(at)] == [11, 12]
    # a label filter: only images with that predicted label
    labels = at.multiselect(key="f_labels")
    label = labels.options[0]
    labels.set_value([label.split(" (")[0]]).run()
    at.radio(key="mode").set_value("Top k").run()
    button(at, "Search").click().run()
    assert not at.exception and results(at)
    n = int(label.rsplit("(", 1)[1].rstrip(")"))
    assert len(results(at)) == min(5, n)
    # weights: all on colour, mix ranks as colour does
    at.multiselect(key="f_labels").set_value([]).run()
    at.slider(key="w_embedding").set_value(0.0)
    at.slider(key="w_hash").set_value(0.0)
    at.slider(key="w_color").set_value(1.0).run()
    button(at, "Search").click().run()
    mix_order = result_keys(at)
    at.selectbox(key="measure").set_value("color").run()
    button(at, "Search").click().run()
    assert result_keys(at) == mix_order


def test_result_details_dialog(filled_lake: Path) -> None:
    at = search_page()
    pick(at)
    button(at, "Search").click().run()
    first = result_keys(at)[0].removeprefix("more_")
    at.button(key=f"details_{first}").click().run()
    assert not at.exception and not at.error
    page = texts(at)
    assert "Palette of this image" in page and "Palette of the query" in page
    assert any(str(filled_lake.parent / "pictures") in c.value for c in at.code)  # the path


def test_the_pages_are_those_of_the_pages_folder_each_listed_once() -> None:
    """The design card's layout: every page a file of pages/, each in st.navigation's list once (so the folder's own
    automatic listing, which Streamlit ignores once st.navigation runs, never shows a page twice)."""
    listed = [f for f, _, _ in app_pages()]
    assert len(listed) == len(set(listed)) and all(f.startswith("pages/") for f in listed)
    assert sorted(listed) == sorted(f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py"))
    assert not (ROOT / "app_pages").exists()
