"""The hand features (decode, resizes, colour, hashes, thumbnail, model crop) of this tree against another version's,
on the same real photos, side by side: CPU ms per photo and stage (median of rounds), and how much the features
differ (hash bits, histogram Hellinger distance, model crop, thumbnail size).

    git archive <commit> imgrec | tar -x -C /tmp/imgrec-before
    .venv/bin/python benchmarks/hand_features.py --against /tmp/imgrec-before          # every set of ../shared/data

Each round runs the other version and this one in turn, each in its own process over the same photos (read into
memory first), so that a load that comes and goes hits both alike. Single-threaded (``extract`` runs in one worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = {"flowers17": "oxford_flowers17/images/*/*.jpg", "corel1k": "corel1k_wang/images/*/*.jpg",
        "dogs_vs_cats": "dogs_vs_cats_200px/images/*.jpg"}

SNIPPET = r"""
import json, sys, time, numpy as np
from pathlib import Path
from imgrec.features.embed import spec
from imgrec.features.extract import decode_side, extract
files, out, rounds = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
blobs = [Path(f).read_bytes() for f in files]
s = spec("efficientnet-lite0")
side = decode_side(s)
stages = {}
for r in range(rounds):
    per = {}
    t0 = time.process_time()
    feats = [extract(b, model=s, min_side=side) for b in blobs]
    total = time.process_time() - t0
    for f in feats:
        for k, v in f.timings.items():
            per[k] = per.get(k, 0.0) + v
    for k, v in per.items():
        stages.setdefault(k, []).append(v * 1000 / len(blobs))
    stages.setdefault("cpu total", []).append(total * 1000 / len(blobs))
np.savez(out, hist=np.stack([f.hist for f in feats]), hashes=np.stack([f.hashes for f in feats]),
         crops=np.stack([f.crop for f in feats]), thumb_kb=np.array([len(f.thumb) / 1024 for f in feats]))
print(json.dumps(stages))
"""


def run(tree: Path, files: list[Path], out: Path, rounds: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SNIPPET, ",".join(map(str, files)), str(out), str(rounds)],
                          cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, required=True, help="folder of the other version's imgrec package")
    ap.add_argument("--n", type=int, default=200, help="photos per set")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each version: 2 passes per round)")
    args = ap.parse_args()
    for name, pattern in SETS.items():
        files = sorted(DATA.glob(pattern))
        if not files:
            print(f"{name}: absent under {DATA}; skipped")
            continue
        files = files[:: max(1, len(files) // args.n)][: args.n]
        times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                for label, tree in (("before", args.against.resolve()), ("after", ROOT)):
                    for k, v in run(tree, files, Path(tmp) / f"{label}.npz", 2).items():
                        times[label].setdefault(k, []).extend(v[1:])  # the first pass warms the caches
            old, new = dict(np.load(Path(tmp) / "before.npz")), dict(np.load(Path(tmp) / "after.npz"))
        print(f"\n## {name}: {len(files)} photos, CPU ms per photo (median of {args.rounds} rounds)")
        keys = sorted(set(times["before"]) | set(times["after"]), key=lambda k: (k == "cpu total", k))
        print("| stage | before | after |\n| --- | --- | --- |")
        for k in keys:
            b, a = (statistics.median(times[v][k]) if k in times[v] else None for v in ("before", "after"))
            print(f"| {k} | {'' if b is None else f'{b:.2f}'} | {'' if a is None else f'{a:.2f}'} |")
        bits = np.bitwise_count(np.bitwise_xor(old["hashes"], new["hashes"]))
        hell = np.sqrt(np.clip(1 - np.sqrt(old["hist"] * new["hist"]).sum(1), 0, None))
        print(f"crops identical: {np.array_equal(old['crops'], new['crops'])}; hash bits differing (of 128): "
              f"median {np.median(bits.sum(1)):.0f}, p95 {np.percentile(bits.sum(1), 95):.0f}, max {bits.sum(1).max()}; "
              f"histogram Hellinger: median {np.median(hell):.4f}, max {hell.max():.4f}; thumbnail kB "
              f"{old['thumb_kb'].mean():.1f} -> {new['thumb_kb'].mean():.1f}")


if __name__ == "__main__":
    main()
