"""The README's first run, timed as a person lives it: `streamlit run app.py` over a lake that does not exist, the
folder typed into the Search page's form and Start, the first images searchable, an uploaded photo's first result,
every image searchable, the Explorer's map. Debian's chromium driven by Playwright, everything on 127.0.0.1.

    python benchmarks/first_run.py --photos ../shared/data/corel1k_wang/images [--query PHOTO]

Prints seconds from the app command for each step, and the lake's own ingestion report (images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _indexed(lake: Path) -> int:
    """Images of the lake's current search index (0 before there is one)."""
    try:
        snap = (lake / "indexes" / "CURRENT").read_text().strip()
        return int(json.loads((lake / "indexes" / snap / "meta.json").read_text())["count"])
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, help="the folder typed into the form")
    ap.add_argument("--query", help="the photo uploaded (default: the folder's first JPEG, resized)")
    ap.add_argument("--chromium", default=os.environ.get("IMGREC_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    wait = args.timeout * 1000

    photos = Path(args.photos).resolve()
    total = sum(1 for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with tempfile.TemporaryDirectory() as tmp:
        lake, query = Path(tmp) / "lake", Path(args.query or Path(tmp) / "query.jpg")
        if not args.query:
            img = Image.open(next(iter(sorted(photos.rglob("*.jpg"))))).convert("RGB")
            img.resize((img.width * 3 // 4, img.height * 3 // 4)).save(query, quality=80)
        port = _port()
        env = {**os.environ, "IMGREC_LAKE": str(lake), "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                 "--server.headless", "true", "--server.address", "127.0.0.1",
                                 "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marks: dict[str, float] = {}
        try:
            base = f"http://127.0.0.1:{port}"
            while not _up(f"{base}/_stcore/health"):
                time.sleep(0.1)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(args.timeout * 1000)
                page.goto(base + "/")
                expect(page.get_by_placeholder("/path/to/photos")).to_be_visible(timeout=wait)
                marks["the first page, with the folder form"] = time.monotonic() - t0
                box = page.get_by_placeholder("/path/to/photos")
                box.fill(str(photos))
                box.press("Enter")
                page.wait_for_timeout(500)
                page.get_by_role("button", name="Start").click()
                t_start = time.monotonic()
                expect(page.get_by_test_id("stFileUploader").first).to_be_visible(timeout=wait)
                marks["the first images searchable (the uploader shows)"] = time.monotonic() - t0
                page.get_by_test_id("stFileUploader").first.locator("input[type=file]").set_input_files(str(query))
                page.wait_for_timeout(300)
                page.get_by_role("button", name="Search", exact=True).click()
                expect(page.get_by_role("button", name="More like this").first).to_be_visible(timeout=wait)
                marks["the first result of an uploaded photo"] = time.monotonic() - t0
                while _indexed(lake) < total and time.monotonic() - t0 < args.timeout:
                    time.sleep(0.2)
                marks[f"every image searchable ({_indexed(lake):,})"] = time.monotonic() - t0
                while not (lake / "projections" / "projections.parquet").is_file() and \
                        time.monotonic() - t0 < args.timeout:
                    time.sleep(0.2)
                marks["the Explorer's map written"] = time.monotonic() - t0
                page.goto(base + "/Explorer")
                expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible(timeout=wait)
                marks["the map on the Explorer page"] = time.monotonic() - t0
                browser.close()
        finally:
            proc.terminate()
            proc.wait(30)
        for what, s in marks.items():
            print(f"{s:7.1f} s  {what}")
        print(f"Start pressed at {t_start - t0:.1f} s; {total:,} photos in {photos}")
        runs = subprocess.run([sys.executable, "-m", "imgrec.cli", "stats", "--lake", str(lake), "--json"],
                              capture_output=True, text=True, cwd=ROOT)
        print(runs.stdout[-1500:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
