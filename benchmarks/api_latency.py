"""The HTTP API's latency for one uploaded photo against the same search on an in-process engine, side by side in
one run: ``imgrec serve --api`` in its own process on a loopback port, a real HTTP client (httpx), the same distinct
uploads (real photos, each made unique so no cache answers), measured in turn.

    .venv/bin/python benchmarks/api_latency.py --lake ~/.cache/imgrec/bench/synth-10000-*    # any lake

Prints p50 / p95 in ms of: the engine's ``search`` (bytes in, results out), the API's POST /search (multipart upload
-> JSON with thumbnail URLs), and the API's search plus fetching the 5 thumbnails.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17" / "images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True, type=Path)
    ap.add_argument("--n", type=int, default=40, help="uploads per side")
    ap.add_argument("--measure", default="mix")
    args = ap.parse_args()
    import socket

    import httpx

    from imgrec.bench.source import unique_upload
    from imgrec.config import Config
    from imgrec.search import Engine

    photos = sorted(DATA.glob("*/*.jpg"))[::30] or sys.exit(f"no photos under {DATA}")
    blobs = [p.read_bytes() for p in photos]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imgrec.cli", "serve", "--api", "--lake", str(args.lake),
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(timeout=60)
        for _ in range(300):
            try:
                if client.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        engine = Engine(Config.load(args.lake))
        made = iter(range(10**9))

        def upload() -> bytes:
            i = next(made)
            return unique_upload(blobs[i % len(blobs)], i)

        def api(data: bytes, thumbs: bool) -> None:
            r = client.post(f"{base}/search", files=[("images", ("q.jpg", data, "image/jpeg"))],
                            data={"measure": args.measure, "k": "5"})
            r.raise_for_status()
            if thumbs:
                for res in r.json()["results"]:
                    client.get(base + res["thumbnail_url"]).raise_for_status()

        for _ in range(3):  # warm: the model in both processes, the graphs, the connection
            engine.search([upload()], measure=args.measure, k=5)
            api(upload(), True)
        times: dict[str, list[float]] = {"engine.search (in process)": [], "API POST /search": [],
                                         "API POST /search + 5 thumbnails": []}
        for _ in range(args.n):
            for name in times:
                data = upload()
                t0 = time.perf_counter()
                if name.startswith("engine"):
                    engine.search([data], measure=args.measure, k=5)
                else:
                    api(data, thumbs="thumbnails" in name)
                times[name].append((time.perf_counter() - t0) * 1000)
        for name, v in times.items():
            v.sort()
            print(f"{name:34s} p50 {statistics.median(v):6.1f} ms   p95 {v[int(0.95 * (len(v) - 1))]:6.1f} ms")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
