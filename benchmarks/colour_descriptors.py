"""Colour descriptors side by side on the labelled sets: every image a query against the rest (exact, brute force),
mAP and P@20 per set, bytes per image; with and without database-side augmentation + query expansion.

    .venv/bin/python benchmarks/colour_descriptors.py                      # Corel-1k, Flowers-17, dogs vs cats (2k)
    .venv/bin/python benchmarks/colour_descriptors.py --only hsv lab-grid

Every descriptor is computed on the colour copy of the ingestion's resize pyramid (at most 128 px: what the lake
stores features from). Candidates (all colour only, no deep feature): the current HSV 8x4x4 histogram; CIELAB
histograms, global and on a grid of regions, with soft (bilinear) bin assignment; colour moments per region;
combinations, square-rooted (Hellinger) and compared by cosine, PCA-compressed where noted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def load_sets(dogs: int) -> dict[str, tuple[list[Path], np.ndarray]]:
    import csv

    out = {}
    for name in ("corel1k_wang", "oxford_flowers17"):
        with open(DATA / name / "labels.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        out[name] = ([DATA / name / r["path"] for r in rows], np.array([int(r["class_id"]) for r in rows]))
    files = sorted((DATA / "dogs_vs_cats_200px" / "images").glob("*.jpg"))
    rng = np.random.default_rng(0)
    files = [files[i] for i in sorted(rng.choice(len(files), min(dogs, len(files)), replace=False))]
    out["dogs_vs_cats"] = (files, np.array([0 if f.name.startswith("cat.") else 1 for f in files]))
    return out


def colour_copies(files: list[Path]) -> list:
    from imgrec.features.embed import spec
    from imgrec.features.extract import decode_side, pyramid
    from imgrec.imaging import decode

    s = spec("efficientnet-lite0")
    return [pyramid(decode(f.read_bytes(), min_side=decode_side(s)).image, None).color for f in files]


def evaluate(X: np.ndarray, labels: np.ndarray, dba: int = 0) -> tuple[float, float]:
    """mAP and P@20, cosine over rows of X (unit norm), every row a query, itself excluded."""
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = X @ X.T
    if dba:
        nn = np.argsort(-S, axis=1)[:, :dba]
        w = (dba - np.arange(dba)) / dba
        X = (X[nn] * w[None, :, None]).sum(1)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        S = X @ X.T
        # alpha query expansion with the 5 nearest (cos^3)
        np.fill_diagonal(S, -np.inf)
        nn = np.argsort(-S, axis=1)[:, :5]
        w = np.take_along_axis(S, nn, 1).clip(0) ** 3
        Q = X + (X[nn] * w[:, :, None]).sum(1)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        S = Q @ X.T
    np.fill_diagonal(S, -np.inf)
    order = np.argsort(-S, axis=1)[:, :-1]
    rel = labels[order] == labels[:, None]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(1)
    ap = ((hits / ranks) * rel).sum(1) / np.maximum(n_rel, 1)
    return float(ap.mean()), float(rel[:, :20].mean())


def _lab(img) -> np.ndarray:
    from PIL import ImageCms

    srgb = ImageCms.createProfile("sRGB")
    lab = ImageCms.createProfile("LAB")
    t = _lab.cache.get("t") or _lab.cache.setdefault("t", ImageCms.buildTransformFromOpenProfiles(
        srgb, lab, "RGB", "LAB"))
    a = np.asarray(ImageCms.applyTransform(img, t), dtype=np.float32)  # L 0..255, a/b 0..255 (128 = 0)
    return a


_lab.cache = {}


def soft_hist(values: np.ndarray, bins: tuple[int, ...], ranges: list[tuple[float, float]]) -> np.ndarray:
    """A joint histogram with bilinear (soft) assignment to neighbouring bins: values (n, d)."""
    n, d = values.shape
    pos = [(values[:, j] - lo) / (hi - lo) * bins[j] - 0.5 for j, (lo, hi) in enumerate(ranges)]
    lo_idx = [np.floor(p).astype(int) for p in pos]
    frac = [p - li for p, li in zip(pos, lo_idx, strict=True)]
    hist = np.zeros(bins, dtype=np.float64)
    for corner in range(2 ** d):
        idx, w = [], np.ones(n)
        for j in range(d):
            bit = (corner >> j) & 1
            ij = np.clip(lo_idx[j] + bit, 0, bins[j] - 1)
            w = w * (frac[j] if bit else 1 - frac[j])
            idx.append(ij)
        np.add.at(hist, tuple(idx), w)
    return (hist / max(hist.sum(), 1e-12)).ravel()


def desc_hsv(img) -> np.ndarray:
    from imgrec.features.color import hsv_histogram

    return np.sqrt(hsv_histogram(img))


def grid_cells(a: np.ndarray, g: int) -> list[np.ndarray]:
    h, w = a.shape[:2]
    return [a[i * h // g:(i + 1) * h // g, j * w // g:(j + 1) * w // g] for i in range(g) for j in range(g)]


def desc_lab(img, bins=(4, 6, 6), grid=0, weight_global=1.0) -> np.ndarray:
    a = _lab(img)
    ranges = [(0, 256), (64, 192), (64, 192)]
    parts = [weight_global * np.sqrt(soft_hist(a.reshape(-1, 3), bins, ranges))]
    if grid:
        for cell in grid_cells(a, grid):
            parts.append(np.sqrt(soft_hist(cell.reshape(-1, 3), bins, ranges)) / grid)
    return np.concatenate(parts)


def desc_hsv_grid(img, grid=2, bins=(8, 3, 3)) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32)
    ranges = [(0, 256), (0, 256), (0, 256)]
    parts = [np.sqrt(soft_hist(hsv.reshape(-1, 3), (8, 4, 4), ranges))]
    for cell in grid_cells(hsv, grid):
        parts.append(np.sqrt(soft_hist(cell.reshape(-1, 3), bins, ranges)) / grid)
    return np.concatenate(parts)


def desc_moments(img, grid=3) -> np.ndarray:
    a = _lab(img)
    out = []
    for cell in grid_cells(a, grid):
        v = cell.reshape(-1, 3)
        out += [v.mean(0) / 255, v.std(0) / 128]
    return np.concatenate(out)


def hsv_codes(img, bins=(8, 4, 4)) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV"), dtype=np.uint16)
    nh, ns, nv = bins
    return (hsv[..., 0] * nh >> 8) * (ns * nv) + (hsv[..., 1] * ns >> 8) * nv + (hsv[..., 2] * nv >> 8)


def correlogram(img, bins=(8, 4, 4), distances=(1, 3, 5, 7)) -> np.ndarray:
    """Auto-correlogram: per colour and distance, the probability that a pixel at that distance (horizontally or
    vertically, both ways) has the same colour."""
    c = hsv_codes(img, bins)
    n = bins[0] * bins[1] * bins[2]
    out = []
    for d in distances:
        same = np.zeros(n)
        total = np.zeros(n)
        for a, b in ((c[:, :-d], c[:, d:]), (c[:-d, :], c[d:, :])):
            total += np.bincount(a.ravel(), minlength=n) + np.bincount(b.ravel(), minlength=n)
            eq = a == b
            same += 2 * np.bincount(a[eq].ravel(), minlength=n)
        out.append(same / np.maximum(total, 1))
    return np.concatenate(out)


def ccv(img, bins=(8, 4, 4), tau_share=0.01) -> np.ndarray:
    """Colour coherence vector: per colour, the share of pixels in large (coherent) and small connected regions."""
    from scipy import ndimage

    c = hsv_codes(img, bins)
    n = bins[0] * bins[1] * bins[2]
    tau = max(1, int(tau_share * c.size))
    coh, inc = np.zeros(n), np.zeros(n)
    for colour in np.unique(c):
        lab, k = ndimage.label(c == colour)
        sizes = np.bincount(lab.ravel())[1:]
        coh[colour] = sizes[sizes >= tau].sum()
        inc[colour] = sizes[sizes < tau].sum()
    return np.concatenate([coh, inc]) / c.size


def soft_hsv(img, bins=(8, 4, 4)) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32).reshape(-1, 3)
    return np.sqrt(soft_hist(hsv, bins, [(0, 256)] * 3))


def combo(*parts):
    def f(im):
        return np.concatenate([w * p(im) / max(np.linalg.norm(p(im)), 1e-12) for w, p in parts])
    return f


DESCRIPTORS = {
    "hsv": desc_hsv,
    "lab-446": lambda im: desc_lab(im, (4, 6, 6)),
    "lab-488": lambda im: desc_lab(im, (4, 8, 8)),
    "lab-446-grid2": lambda im: desc_lab(im, (4, 6, 6), grid=2),
    "lab-334-grid2": lambda im: np.concatenate([desc_lab(im, (4, 6, 6)), desc_lab(im, (3, 3, 4), grid=2)[96:]]),
    "lab-446-grid3": lambda im: desc_lab(im, (4, 6, 6), grid=3),
    "hsv-grid2": desc_hsv_grid,
    "moments3": desc_moments,
    "hsv-soft": soft_hsv,
    "hsv-16x4x4-soft": lambda im: soft_hsv(im, (16, 4, 4)),
    "correlogram": lambda im: np.sqrt(correlogram(im)),
    "ccv": lambda im: np.sqrt(ccv(im)),
    "hsv+correlogram": combo((1.0, desc_hsv), (1.0, lambda im: np.sqrt(correlogram(im)))),
    "hsv+ccv": combo((1.0, desc_hsv), (1.0, lambda im: np.sqrt(ccv(im)))),
    "hsv+grid2+correlogram": combo((1.0, desc_hsv_grid), (1.0, lambda im: np.sqrt(correlogram(im)))),
    "layout": lambda im: _layout(im),  # imgrec's colour layout (imgrec.features.color.layout_descriptor)
    "layout-pca128": lambda im: _layout(im),  # ... PCA'd to 128 dims on the set, as the index does (f16)
}
PCA = {"layout-pca128": 128}


def _layout(im) -> np.ndarray:
    from imgrec.features.color import layout_descriptor

    return layout_descriptor(im)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--dogs", type=int, default=2000)
    args = ap.parse_args()
    sets = load_sets(args.dogs)
    t0 = time.perf_counter()
    copies = {name: colour_copies(files) for name, (files, _) in sets.items()}
    print(f"decoded {sum(len(v) for v in copies.values())} photos in {time.perf_counter() - t0:.0f} s")
    names = args.only or list(DESCRIPTORS)
    print("| descriptor | dims | " + " | ".join(f"{s} mAP | P@20 | +DBA/QE mAP | P@20" for s in sets) + " |")
    for name in names:
        fn = DESCRIPTORS[name]
        cells = []
        dims = 0
        for sname, (_, labels) in sets.items():
            X = np.stack([fn(im) for im in copies[sname]]).astype(np.float32)
            if name in PCA:
                from imgrec import similarity as sim

                X = sim.apply_whitening(X, *sim.fit_whitening(X, PCA[name], 0.0)).astype(np.float16).astype(np.float32)
            dims = X.shape[1]
            m, p = evaluate(X, labels)
            m2, p2 = evaluate(X, labels, dba=8)
            cells += [f"{m:.3f}", f"{p:.3f}", f"{m2:.3f}", f"{p2:.3f}"]
        print(f"| {name} | {dims} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
