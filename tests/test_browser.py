"""End to end in a real headless browser: Debian's chromium, driven by Playwright (never its own browser download),
against the app started as a real `streamlit run` process on a free loopback port, over a lake built here.

Every page listed in the sidebar is opened and screenshotted; on the Search page an image is uploaded, 5 result
thumbnails with their scores must show, and "More like this" must give a different result set. Screenshots (and the
server's log) go to $IMGREC_ARTIFACTS, else artifacts/browser/ at the repository root.

Where chromium or the playwright module is missing the tests skip with the reason, except when $CI is set: then they
fail, so that CI cannot pass without running them (`.ci/run` installs Debian's chromium).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import app_pages, ingest_quietly, make_collection, save, synthetic_image

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("IMGREC_CHROMIUM") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("IMGREC_ARTIFACTS") or ROOT / "artifacts" / "browser")
# headless and a fresh user-data-dir come from Playwright's launch; without the background-networking flags
# chromium stalls on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
N_IMAGES = 20  # more than 2 * k, so that "more like this" can change the result set
K = 5  # the Search page's default number of results
SERVER_START_S = 60
SEARCH_TIMEOUT_MS = 60_000  # the first upload search loads the embedding model
PAGE_TIMEOUT_MS = 30_000
SETTLE_MS = 700
VIEWPORT = {"width": 1400, "height": 1000}
FIRST_SCREEN = {"width": 1280, "height": 800}  # what shows without scrolling must fit in this
MAX_SHOT_HEIGHT = 8000
RESULT_LABEL = re.compile(r"^#(\d+) · (-?\d+\.\d{3})$")  # the card's "**#<rank> · <score>**" line, rendered

# The result cards, read in the page: each bold "#rank · score" line, and the innermost block around it that also
# holds an image and a "More like this" button (and no other result line).
READ_CARDS_JS = r"""
() => {
  const re = /^#(\d+) · (-?\d+\.\d{3})$/;
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  const labels = [...main.querySelectorAll('[data-testid="stMarkdownContainer"] strong')]
    .filter(s => re.test(s.textContent.trim()) && !s.closest('[data-stale="true"]'));
  return labels.map(s => {
    let block = s.closest('[data-testid="stVerticalBlock"]');
    while (block && !(block.querySelector('[data-testid="stImage"] img')
                      && [...block.querySelectorAll('button')].some(b => /More like this/i.test(b.textContent)))) {
      block = block.parentElement && block.parentElement.closest('[data-testid="stVerticalBlock"]');
    }
    const card = {label: s.textContent.trim(), img: null, loaded: false, width: 0, captions: [], ok: false};
    if (!block) return card;
    const ranks = [...block.querySelectorAll('[data-testid="stMarkdownContainer"] strong')]
      .filter(t => re.test(t.textContent.trim()));
    const img = block.querySelector('[data-testid="stImage"] img');
    const box = img.getBoundingClientRect();
    card.ok = ranks.length === 1;
    card.img = img.getAttribute('src');
    card.loaded = img.complete && img.naturalWidth > 0;
    card.width = box.width;
    card.captions = [...block.querySelectorAll('[data-testid="stCaptionContainer"]')].map(c => c.textContent.trim());
    return card;
  });
}
"""


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"{reason}; CI is set, so the browser test must run, not skip")
    pytest.skip(reason)


def _chromium() -> str:
    path = shutil.which(CHROMIUM) or CHROMIUM
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        _unavailable(f"no chromium binary at {CHROMIUM} (install Debian's `chromium`, or set IMGREC_CHROMIUM)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via $http_proxy
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status == 200 and resp.read().strip() == b"ok"
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # only this test's screenshots live here: no stale ones from an earlier run
        old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("the playwright module is not installed (pip install -e '.[dev]')")
    expect.set_options(timeout=PAGE_TIMEOUT_MS)  # the default 5 s is short for a loaded CI machine
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:

    base = tmp_path_factory.mktemp("browser")
    make_collection(base / "photos", N_IMAGES)
    report = ingest_quietly(base / "photos", base / "lake")
    assert report.processed == N_IMAGES, report.summary()
    return base / "lake"


@contextlib.contextmanager
def _serve(lake: Path, log_path: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free loopback port, over ``lake``; its base URL."""
    port = _free_port()
    env = {**os.environ, "IMGREC_LAKE": str(lake), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           # no file watcher: an edit of a page during the test would otherwise show "Source file changed"
           "--server.fileWatcherType", "none"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(f"{base}/_stcore/health"):
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode} before it was up:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the app was not healthy within {SERVER_START_S} s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield base
    finally:
        _stop(proc)
        print(f"\nserver log: {log_path}")


@pytest.fixture(scope="module")
def server(browser: Browser, lake: Path, artifacts: Path) -> Iterator[str]:
    """The app over the test's lake."""
    with _serve(lake, artifacts / "server.log") as base:
        yield base


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture
def page(browser: Browser, server: str, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context; on a failure of the test, a screenshot of what the browser showed."""
    context = browser.new_context(viewport=VIEWPORT)
    # loopback only: anything else (e.g. the icons Streamlit would fetch from fonts.gstatic.com) is refused here
    context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), lambda route: route.abort())
    pg = context.new_page()
    pg.set_default_timeout(PAGE_TIMEOUT_MS)
    failed_before = request.session.testsfailed
    try:
        yield pg
    finally:
        if request.session.testsfailed > failed_before:  # the call's report is counted before this teardown
            try:
                path = artifacts / f"failure_{request.node.name}.png"
                pg.screenshot(path=path, full_page=True)
                print(f"\nfailure screenshot: {path}")
            except Exception as exc:  # best effort only
                print(f"\n(no failure screenshot: {exc})")
        context.close()


def _settle(pg: Page, what: str) -> None:
    """Wait until Streamlit has finished the run (no "Running" status widget, no stale elements), then a moment."""
    from playwright.sync_api import expect

    expect(pg.get_by_test_id("stApp")).to_be_visible()
    expect(pg.get_by_test_id("stAppSkeleton"), f"{what}: app still loading").to_have_count(0)
    expect(pg.get_by_test_id("stStatusWidget"), f"{what}: still running").to_have_count(0, timeout=SEARCH_TIMEOUT_MS)
    expect(pg.locator('[data-testid="stMain"] [data-stale="true"]'), f"{what}: stale elements").to_have_count(
        0, timeout=SEARCH_TIMEOUT_MS)
    # lazily loaded elements (dataframes, code, charts) show a skeleton until their code is in
    expect(pg.get_by_test_id("stSkeleton"), f"{what}: elements still loading").to_have_count(0)
    pg.wait_for_timeout(SETTLE_MS)
    # images finish loading (their bytes come from the server's media endpoint)
    pg.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=PAGE_TIMEOUT_MS)
    _no_exception(pg, what)


def _no_exception(pg: Page, what: str) -> None:
    exc = pg.get_by_test_id("stException")
    if exc.count():
        pytest.fail(f"{what}: Streamlit shows an exception:\n{exc.first.inner_text()}")


def _shot(pg: Page, artifacts: Path, name: str) -> Path:
    """The whole page: Streamlit scrolls inside stMain, so the viewport is made as tall as its content first."""
    path = artifacts / f"{name}.png"
    pg.mouse.move(VIEWPORT["width"] - 20, VIEWPORT["height"] - 20)  # an empty spot: no hover highlight in the picture
    height = pg.evaluate("""() => Math.max(
        ...['stMain', 'stSidebarContent'].map(id => document.querySelector(`[data-testid="${id}"]`))
          .filter(Boolean).map(e => e.scrollHeight), window.innerHeight)""")
    pg.set_viewport_size({"width": VIEWPORT["width"], "height": min(int(height), MAX_SHOT_HEIGHT)})
    try:
        pg.wait_for_timeout(300)  # re-layout, lazy images
        pg.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=PAGE_TIMEOUT_MS)
        pg.screenshot(path=path, full_page=True)
    finally:
        pg.set_viewport_size(VIEWPORT)
    print(f"\nscreenshot: {path}")
    return path


def _cards(pg: Page) -> list[dict[str, Any]]:
    return pg.evaluate(READ_CARDS_JS)


def _check_results(pg: Page, what: str) -> list[dict[str, Any]]:
    """K result cards, each with a loaded, visible thumbnail and its "#rank · score" line, ranks 1..K."""
    from playwright.sync_api import expect

    expect(pg.get_by_role("button", name="More like this"), f"{what}: result cards").to_have_count(K)
    cards = _cards(pg)
    errors = [e.strip() for e in pg.get_by_test_id("stAlert").all_inner_texts()]
    assert len(cards) == K, f"{what}: {len(cards)} result lines, expected {K}: {cards}; alerts: {errors}"
    for c in cards:
        assert c["ok"], f"{what}: no result card with an image and 'More like this' around {c['label']!r}: {c}"
        assert c["img"] and c["loaded"] and c["width"] > 10, f"{what}: thumbnail not shown for {c['label']!r}: {c}"
    ranks = [int(RESULT_LABEL.match(c["label"]).group(1)) for c in cards]
    assert ranks == list(range(1, K + 1)), f"{what}: ranks {ranks}"
    for label in (c["label"] for c in cards):
        expect(pg.get_by_text(label, exact=True).first, f"{what}: score line {label!r}").to_be_visible()
    return cards


def _pages(pg: Page, base: str) -> list[tuple[str, str]]:
    """(name, url) of every page in the sidebar's navigation, home first."""
    from playwright.sync_api import expect

    pg.goto(base + "/")
    links = pg.get_by_test_id("stSidebarNavLink")
    expect(links.first).to_be_visible()
    out: dict[str, str] = {}
    for a in links.all():
        href = a.get_attribute("href") or ""
        path = href.removeprefix(base).split("?")[0].strip("/")
        out.setdefault(path, href)
    return [(path or "home", url) for path, url in sorted(out.items(), key=lambda kv: kv[0] != "")]


def test_every_page_renders(page: Page, server: str, artifacts: Path) -> None:
    from playwright.sync_api import expect

    page.goto(server + "/")
    expect(page.get_by_test_id("stMain").locator("h1").first).to_have_text("Search")  # the app opens on Search
    pages = _pages(page, server)
    names = [n for n, _ in pages]
    assert names[0] == "home" and {"Collection", "Join", "Explorer", "Quality", "Profiling", "Lake"} <= set(names), \
        f"sidebar pages: {names}"
    # each page of pages/ once: st.navigation's list, not Streamlit's automatic listing of that folder beside it
    titles = [a.inner_text().strip().splitlines()[-1].strip()  # the icon's ligature name comes first
              for a in page.get_by_test_id("stSidebarNavLink").all()]
    assert sorted(titles) == sorted(title for _, title, _ in app_pages()), f"sidebar links: {titles}"
    for i, (name, url) in enumerate(pages):
        page.goto(url)
        expect(page.get_by_test_id("stMain").locator("h1").first, f"{name}: title").to_be_visible()
        _settle(page, name)
        _shot(page, artifacts, f"page_{i}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}")
    print(f"\npages: {names}")


def _click_and_check(page: Any, artifacts: Path, button: Any, heading: str, what: str, shot: str
                     ) -> list[dict[str, Any]]:
    """Click a button that searches, wait for the results' heading, check the 5 cards, screenshot them."""
    from playwright.sync_api import expect

    started = time.monotonic()
    button.click()
    expect(page.get_by_role("heading", name=re.compile(heading)), f"{what} heading").to_be_visible(
        timeout=SEARCH_TIMEOUT_MS)
    _settle(page, what)
    cards = _check_results(page, what)
    print(f"\n{what}: {time.monotonic() - started:.1f} s; {[(c['label'], c['captions'][-1:]) for c in cards]}")
    _shot(page, artifacts, shot)
    return cards


def test_upload_search_then_more_like_this(page: Page, server: str, artifacts: Path,
                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    query = save(synthetic_image(1234), tmp_path / "query_photo.jpg")  # not in the lake
    page.set_viewport_size(FIRST_SCREEN)
    page.goto(server + "/")  # where the app opens
    expect(page.get_by_role("tab", name="Upload images")).to_be_visible()
    _settle(page, "search page")
    uploader = page.get_by_test_id("stFileUploader").first.bounding_box()
    assert uploader and uploader["y"] + uploader["height"] <= FIRST_SCREEN["height"], \
        f"the upload box is not on the first screen of a 1280x800 window: {uploader}"

    page.get_by_role("tab", name="Upload images").click()
    page.get_by_test_id("stFileUploader").first.locator("input[type=file]").set_input_files(str(query))
    expect(page.get_by_text("query_photo.jpg").first).to_be_visible()
    _settle(page, "after upload")
    search = page.get_by_role("button", name="Search", exact=True)
    expect(search).to_be_enabled()

    first = _click_and_check(page, artifacts, search, r"^Results for", "upload search", "search_1_upload_results")
    page.set_viewport_size(FIRST_SCREEN)
    page.get_by_test_id("stMain").evaluate("e => e.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=artifacts / "search_first_screen_1280x800.png")
    score = page.get_by_text(RESULT_LABEL).first.bounding_box()  # the first card's "#1 · score", below its picture
    assert score and score["y"] + score["height"] <= FIRST_SCREEN["height"], \
        f"the first result is not on the first screen of a 1280x800 window: {score}"
    page.set_viewport_size(VIEWPORT)
    top = page.get_by_role("button", name="More like this").first
    top.scroll_into_view_if_needed()
    second = _click_and_check(page, artifacts, top, r"^More like #\d+", "more like this", "search_2_more_like_this")

    def key(cards: list[dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...]]]:
        return [(c["label"], c["img"], tuple(c["captions"])) for c in cards]

    assert key(second) != key(first), f"'More like this' did not change the results: {key(first)}"
    assert [c["captions"] for c in second] != [c["captions"] for c in first], "same images after 'More like this'"


# Every chart's marks, read in the page: per Vega-Lite chart, how many of its marks have an area on screen (an
# "empty axis and no bar" chart has none).
CHART_MARKS_JS = r"""
() => [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stVegaLiteChart"]')].map(c => {
  const marks = [...c.querySelectorAll('g[class*="mark-"] path, g[class*="mark-"] rect')]
    .filter(m => { const b = m.getBoundingClientRect(); return b.width > 0.5 && b.height > 0.5; });
  return {marks: marks.length, height: c.getBoundingClientRect().height};
})
"""


def _charts_drawn(pg: Page, at_least: int) -> list[dict[str, Any]]:
    """The page's charts and their marks, once at least ``at_least`` charts are there and every one has marks (Vega
    draws after Streamlit's run has ended: on a loaded machine a chart can still be empty when the page is
    settled), or as they are after PAGE_TIMEOUT_MS; the page's text is printed when they are not all drawn."""
    from playwright.sync_api import Error

    ready = f"() => {{ const c = ({CHART_MARKS_JS})(); return c.length >= {at_least} && c.every(x => x.marks > 0); }}"
    try:
        pg.wait_for_function(ready, timeout=PAGE_TIMEOUT_MS)
    except Error:
        print("\npage text:\n" + pg.get_by_test_id("stMain").inner_text()[:3000])
    return pg.evaluate(CHART_MARKS_JS)


@pytest.fixture(scope="module")
def odd_lakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A lake of JPEGs only, all in one folder (with a map), and a lake whose only image was removed (empty)."""
    from imgrec.config import Config
    from pipelines.project import Params, project

    base = tmp_path_factory.mktemp("odd")
    for i in range(8):
        save(synthetic_image(300 + i), base / "jpegs" / f"photo_{i}.jpg")
    ingest_quietly(base / "jpegs", base / "one_format")
    project(Config.load(base / "one_format").lake, "embedding", Params())
    save(synthetic_image(1), base / "gone" / "x.jpg")
    ingest_quietly(base / "gone", base / "empty")
    (base / "gone" / "x.jpg").unlink()
    ingest_quietly(base / "gone", base / "empty")
    return {"one format, one folder": base / "one_format", "empty": base / "empty"}


@pytest.mark.parametrize("kind", ["one format, one folder", "empty"])
def test_every_chart_of_every_page_draws_its_marks(browser: Browser, odd_lakes: dict[str, Path], artifacts: Path,
                                                   kind: str) -> None:
    """On a lake of one format and one folder, and on an empty one, every page renders without an exception and
    every chart shows marks (a one-format lake's Formats chart once drew an empty axis)."""
    context = browser.new_context(viewport=VIEWPORT)
    context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), lambda route: route.abort())
    pg = context.new_page()
    pg.set_default_timeout(PAGE_TIMEOUT_MS)
    slug = re.sub(r"[^a-z]+", "_", kind)
    try:
        with _serve(odd_lakes[kind], artifacts / f"server_{slug}.log") as base:
            charts = {}
            from playwright.sync_api import expect

            for name, url in _pages(pg, base):
                pg.goto(url)
                expect(pg.get_by_test_id("stMain").locator("h1").first, f"{kind}: {name}: title").to_be_visible()
                _settle(pg, f"{kind}: {name}")
                charts[name] = _charts_drawn(pg, 3 if name == "Collection" and kind != "empty" else 0)
                _shot(pg, artifacts, f"odd_{slug}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}")
            empty = {n: c for n, c in charts.items() if any(x["marks"] == 0 for x in c)}
            assert not empty, f"{kind}: charts without marks: {empty}"
            if kind != "empty":
                assert charts["Collection"] and len(charts["Collection"]) >= 3, charts  # formats, sizes, dimensions
    finally:
        context.close()


FIRST_RUN_PHOTOS = 40
FIRST_RUN_TIMEOUT_MS = 180_000  # start-up, the first images searchable, then the map (a loaded 2-core machine)


def test_first_run_from_an_empty_lake_to_results_and_a_map(browser: Browser, artifacts: Path,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """The README's first run, as a person does it: the app over a lake that does not exist yet opens on the folder
    form; a folder of 40 photos typed in and Start: the progress shows, then the uploader; an uploaded photo gives 5
    results; the Explorer then shows the map (its progress first, while it is being made)."""
    from playwright.sync_api import expect

    base = tmp_path_factory.mktemp("first_run")
    make_collection(base / "my photos", FIRST_RUN_PHOTOS)
    query = save(synthetic_image(4321), base / "query_photo.jpg")  # not in the folder
    lake = base / "lake"
    context = browser.new_context(viewport=VIEWPORT)
    context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        with _serve(lake, artifacts / "server_first_run.log") as server:
            started = time.monotonic()
            page.goto(server + "/")
            expect(page.get_by_test_id("stMain").locator("h1").first).to_have_text("Search")
            expect(page.get_by_text("There is no lake at").first).to_be_visible()
            _settle(page, "empty lake")
            _shot(page, artifacts, "first_run_1_empty_lake")
            assert page.get_by_test_id("stFileUploader").count() == 0  # nothing to search yet
            folder = page.get_by_placeholder("/path/to/photos")
            folder.fill(str(base / "my photos"))
            folder.press("Enter")
            _settle(page, "folder typed")
            page.get_by_role("button", name="Start").click()
            expect(page.get_by_test_id("stProgress").first, "the ingestion's progress").to_be_visible(
                timeout=PAGE_TIMEOUT_MS)
            _shot(page, artifacts, "first_run_2_progress")
            uploader = page.get_by_test_id("stFileUploader").first
            expect(uploader, "the uploader, once the first images are searchable").to_be_visible(
                timeout=FIRST_RUN_TIMEOUT_MS)
            searchable = time.monotonic() - started
            _settle(page, "first images searchable")
            page.get_by_role("tab", name="Upload images").click()
            uploader.locator("input[type=file]").set_input_files(str(query))
            expect(page.get_by_text("query_photo.jpg").first).to_be_visible()
            _settle(page, "after upload")
            _click_and_check(page, artifacts, page.get_by_role("button", name="Search", exact=True),
                             r"^Results for", "first run: upload search", "first_run_3_results")
            first_result = time.monotonic() - started
            page.goto(server + "/Explorer")
            expect(page.get_by_test_id("stMain").locator("h1").first).to_have_text("Explorer")
            expect(page.get_by_test_id("stVegaLiteChart").first, "the map").to_be_visible(
                timeout=FIRST_RUN_TIMEOUT_MS)
            _settle(page, "explorer with its map")
            _charts_drawn(page, 1)
            _shot(page, artifacts, "first_run_4_map")
            print(f"\nfirst run, {FIRST_RUN_PHOTOS} photos: searchable after {searchable:.1f} s, first result "
                  f"{first_result:.1f} s, map {time.monotonic() - started:.1f} s after the first page")
    finally:
        context.close()
