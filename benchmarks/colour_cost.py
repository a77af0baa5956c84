"""What the colour layout costs beside the histogram: bytes per image in the lake and the index, and search time
(the colour measure by layout vs by Hellinger, and the mix), side by side in one process on one lake.

    .venv/bin/python benchmarks/colour_cost.py --lake ~/.cache/imgrec/eval/dogs_vs_cats_200px-*
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True, type=Path)
    ap.add_argument("--n", type=int, default=300, help="queries (images of the lake, by id)")
    args = ap.parse_args()
    import numpy as np

    from imgrec.config import Config
    from imgrec.index import current_dir
    from imgrec.lake import Lake
    from imgrec.search import Engine

    lake = Lake(args.lake)
    engine = Engine(Config.load(args.lake))
    idx = engine.index
    n = idx.size
    snap = current_dir(lake)
    size = {f.name: f.stat().st_size for f in snap.iterdir() if f.is_file()}
    man = lake.manifest()
    lake_bytes = {t: sum((lake.root / p).stat().st_size for p in man.tables[t]) for t in ("color", "color_layout")}
    print(f"lake: {n:,} images; colour histogram {lake_bytes['color'] / n:.0f} B/image, colour layout "
          f"{lake_bytes['color_layout'] / n:.0f} B/image (Parquet, zstd)")
    hist = size["color.npy"] + size["color.usearch"]
    lay = size.get("layout.npy", 0) + size.get("layout.usearch", 0) + size.get("layout_space.npz", 0)
    total = sum(size.values())
    print(f"index: histogram {hist / n:.0f} B/image (color.npy + graph), layout {lay / n:.0f} B/image "
          f"(layout.npy + graph + PCA); whole index {total / n:.0f} B/image")
    rng = np.random.default_rng(0)
    queries = [int(i) for i in idx.ids[rng.choice(n, min(args.n, n), replace=False)]]
    runs = {"color / layout": ("color", "layout"), "color / hellinger": ("color", "hellinger"),
            "mix": ("mix", None), "embedding": ("embedding", None)}
    for m, d in runs.values():  # warm: graphs restored, radius table built
        engine.search(queries[:3], m, k=5, distance=d)
    times = {name: [] for name in runs}
    for q in queries:
        for name, (m, d) in runs.items():
            t = time.perf_counter()
            engine.search([q], m, k=5, distance=d)
            times[name].append((time.perf_counter() - t) * 1000)
    for name, v in times.items():
        print(f"{name:20s} p50 {statistics.median(v):6.2f} ms  p95 {sorted(v)[int(0.95 * (len(v) - 1))]:6.2f} ms")


if __name__ == "__main__":
    main()
