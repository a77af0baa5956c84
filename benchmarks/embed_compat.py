"""Are this tree's features those of another version of imgrec, for the same photos? (embedding compatibility check)

Runs the whole torch-free extraction (``extract``) and ``Embedder.embed`` in both trees on the same real photos
(every k-th of ../shared/data/oxford_flowers17) in subprocesses, then compares: embedding cosine per image (batch 32
as ingestion runs, and batch 1 as a query runs), top-1/top-5 labels, and exact equality of the colour histogram,
hashes, thumbnail bytes and model crop.

    .venv/bin/python benchmarks/embed_compat.py --against /tmp/imgrec-orig     # a copy of the version before

``--against`` is a folder holding the other version's ``imgrec`` package (e.g. ``git archive HEAD imgrec | tar -x``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17"

SNIPPET = r"""
import hashlib, sys, numpy as np
from pathlib import Path
from imgrec.features.embed import Embedder, spec
from imgrec.features.extract import decode_side, extract
files, out, model = [Path(p) for p in sys.argv[1].split(",")], sys.argv[2], sys.argv[3]
s = spec(model)
feats = [extract(f.read_bytes(), model=s, min_side=decode_side(s)) for f in files]
crops = np.stack([f.crop for f in feats])
e = Embedder(model, "cpu")
b32 = [e.embed(crops[i:i + 32]) for i in range(0, len(crops), 32)]
b1 = [e.embed(crops[i:i + 1]) for i in range(len(crops))]
np.savez(out, emb=np.concatenate([b[0] for b in b32]), top=np.concatenate([b[1] for b in b32]),
         emb1=np.concatenate([b[0] for b in b1]), crops=crops, hist=np.stack([f.hist for f in feats]),
         hashes=np.stack([f.hashes for f in feats]),
         thumbs=np.array([hashlib.blake2b(f.thumb).hexdigest() for f in feats]))
"""


def features(tree: Path, files: list[Path], model: str, out: Path) -> dict[str, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", SNIPPET, ",".join(map(str, files)), str(out), model], cwd=tree, env=env,
                   check=True)
    return dict(np.load(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, required=True, help="folder of the other version's imgrec package")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--model", default="efficientnet-lite0")
    args = ap.parse_args()
    all_files = sorted((DATA / "images").glob("*/*.jpg"))
    if not all_files:
        sys.exit(f"no images under {DATA}/images: the shared data set is absent; nothing to compare")
    files = all_files[:: max(1, len(all_files) // args.n)][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        old = features(args.against.resolve(), files, args.model, Path(tmp) / "old.npz")
        new = features(ROOT, files, args.model, Path(tmp) / "new.npz")
    for key in ("crops", "hist", "hashes", "thumbs"):
        print(f"{key:8s} identical: {np.array_equal(old[key], new[key])}")
    for label, a, b in (("batch 32 new vs old", new["emb"], old["emb"]), ("batch 1 new vs old", new["emb1"], old["emb1"]),
                        ("batch 1 new vs batch 32 old", new["emb1"], old["emb"]),
                        ("batch 1 vs batch 32 (new)", new["emb1"], new["emb"])):
        cos = np.sum(a * b, axis=1)
        print(f"cosine {label:28s} min {cos.min():.7f} mean {cos.mean():.7f}  max |diff| {np.abs(a - b).max():.2e}")
    print(f"top-1 equal {np.mean(old['top'][:, 0] == new['top'][:, 0]):.3f}, "
          f"top-5 sets equal {np.mean([set(x) == set(y) for x, y in zip(old['top'], new['top'], strict=True)]):.3f} "
          f"({len(files)} photos)")


if __name__ == "__main__":
    main()
