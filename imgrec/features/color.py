"""HSV colour histogram.

Hue carries what people call "the colour", and HSV keeps it apart from saturation and brightness, so a change of
lighting moves mass along value rather than across hues. Hue gets the finest binning (8 bins of 45 degrees); 4
saturation and 4 value bins separate greys, pastels and vivid colours, and dark from bright. 8x4x4 = 128 bins is small
enough for an in-memory index over a million images and coarse enough that a re-encoded or resized copy lands in the
same bins.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgrec.imaging import fit_within

WORK_SIZE = 128  # the histogram is computed on a copy of at most this many pixels per side


def hsv_pixels(img: Image.Image) -> NDArray[np.uint8]:
    """The (rows, cols, 3) HSV pixels of a picture reduced to at most WORK_SIZE px a side: what the histogram and the
    layout are computed on (converted once for both, ``extract``)."""
    small = img if max(img.size) <= WORK_SIZE else img.resize(fit_within(img.size, WORK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small.convert("HSV"))


def hsv_histogram(img: Image.Image | NDArray[np.uint8], bins: tuple[int, int, int] = (8, 4, 4)) -> NDArray[np.float32]:
    """L1-normalised joint HSV histogram of an RGB image (or of its ``hsv_pixels``), flattened in (hue, saturation,
    value) order."""
    a = hsv_pixels(img) if isinstance(img, Image.Image) else img
    hsv = a.reshape(-1, 3).astype(np.uint16)
    nh, ns, nv = bins
    idx = (hsv[:, 0] * nh >> 8) * (ns * nv) + (hsv[:, 1] * ns >> 8) * nv + (hsv[:, 2] * nv >> 8)
    hist = np.bincount(idx, minlength=nh * ns * nv).astype(np.float32)
    return hist / max(float(hist.sum()), 1.0)


def palette(hist: NDArray[np.floating], bins: tuple[int, int, int] = (8, 4, 4), n: int = 6
            ) -> list[tuple[str, float]]:
    """The ``n`` heaviest bins of an HSV histogram as (``#rrggbb``, share of pixels).

    The colour is the bin's hue centre; saturation and value run from grey / dark for the first bin to full for the
    last, so that the least saturated bin shows as grey-white rather than as a tint.
    """
    import colorsys

    h = np.asarray(hist, dtype=np.float64).ravel()
    nh, ns, nv = bins
    if h.size != nh * ns * nv:
        raise ValueError(f"a {nh}x{ns}x{nv} histogram has {nh * ns * nv} bins, not {h.size}")
    total = h.sum()
    out = []
    for i in np.argsort(-h, kind="stable")[:n]:
        if h[i] <= 0:
            break
        hi, rest = divmod(int(i), ns * nv)
        si, vi = divmod(rest, nv)
        sat = si / (ns - 1) if ns > 1 else 1.0
        val = min(1.0, (vi + 0.75) / nv)
        r, g, b = colorsys.hsv_to_rgb((hi + 0.5) / nh, sat, val)
        out.append((f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}", float(h[i] / total)))
    return out


# --- the colour layout descriptor (the colour measure's default) --------------------------------------------------

LAYOUT_BINS = (8, 4, 4)  # the global histogram's and the correlogram's colours
CELL_BINS = (8, 3, 3)  # each of the 2 x 2 regions' histogram
CORRELOGRAM_DISTANCES = (1, 3, 5, 7)
LAYOUT_DIMS = 128 + 4 * 72 + 128 * len(CORRELOGRAM_DISTANCES)  # 928


def _correlogram(codes: NDArray[np.int32], n: int, distances: tuple[int, ...]) -> NDArray[np.float64]:
    """Auto-correlogram: per colour and distance, the share of its pixels whose neighbour at that distance
    (horizontally and vertically, both ways) has the same colour: how much a colour comes in patches."""
    full = np.bincount(codes.ravel(), minlength=n).astype(np.float64)
    out = []
    for d in distances:
        if d >= min(codes.shape):
            out.append(np.zeros(n))
            continue
        same = (np.bincount(codes[:, :-d][codes[:, :-d] == codes[:, d:]], minlength=n)
                + np.bincount(codes[:-d, :][codes[:-d, :] == codes[d:, :]], minlength=n))
        total = (4 * full - np.bincount(codes[:, -d:].ravel(), minlength=n) - np.bincount(codes[:, :d].ravel(), minlength=n)
                 - np.bincount(codes[-d:, :].ravel(), minlength=n) - np.bincount(codes[:d, :].ravel(), minlength=n))
        out.append(2 * same / np.maximum(total, 1))
    return np.concatenate(out)


def layout_descriptor(img: Image.Image | NDArray[np.uint8]) -> NDArray[np.float32]:
    """The colour layout of a picture (reduced to at most WORK_SIZE px; or its ``hsv_pixels``): which colours, where,
    and in what patches.

    Three parts, each square-rooted (so that a dot product is a Hellinger-like similarity) and the first two
    together and the third weighted equally: the soft-hue HSV 8x4x4 histogram of the whole picture; an 8x3x3 one
    of each quarter (top-left, top-right, bottom-left, bottom-right), so a blue sky above green grass differs from
    the reverse; and the auto-correlogram of the 8x4x4 colours at 1, 3, 5 and 7 px. 928 numbers, about 1 ms;
    the index compresses them (PCA to 128 dimensions, fitted on the collection). Measured on the labelled sets
    against the HSV histogram alone: docs/relevance.md.
    """
    a = hsv_pixels(img) if isinstance(img, Image.Image) else img
    rows, cols = a.shape[:2]
    nh, ns, nv = LAYOUT_BINS
    hue, sat, val = (a[..., i].astype(np.int32) for i in range(3))
    # the soft hue: each pixel shared between its two nearest hue bins (circularly), so that a colour on a bin's edge
    # does not jump from one bin to the other between two photos of the same thing; computed once for the whole
    # picture and its quarters (both have nh hue bins)
    pos = hue.astype(np.float32) * np.float32(nh / 256.0) - np.float32(0.5)
    lo = np.floor(pos)
    frac = pos - lo
    h0 = lo.astype(np.int32) % nh
    h1 = (h0 + 1) % nh
    whole = np.sqrt(_normalised(_soft_counts(h0, h1, frac, (sat * ns >> 8) * nv + (val * nv >> 8), ns * nv,
                                             nh * ns * nv)))
    parts = (h0, h1, frac, sat, val)
    for axis, size in ((0, rows), (1, cols)):
        if size < 2:  # a picture 1 px high (wide): its top and bottom (left and right) halves are that row (column)
            parts = tuple(np.repeat(x, 2, axis=axis) for x in parts)
    quarters = _quarter_histograms(*parts)
    colours = np.concatenate([whole, *quarters])
    colours /= max(float(np.linalg.norm(colours)), 1e-12)
    codes = (hue * nh >> 8) * (ns * nv) + (sat * ns >> 8) * nv + (val * nv >> 8)
    patches = np.sqrt(_correlogram(codes, nh * ns * nv, CORRELOGRAM_DISTANCES))
    patches /= max(float(np.linalg.norm(patches)), 1e-12)
    return np.concatenate([colours, patches]).astype(np.float32)


def _quarter_histograms(h0: NDArray[np.int32], h1: NDArray[np.int32], frac: NDArray[np.float32],
                        sat: NDArray[np.int32], val: NDArray[np.int32]) -> list[NDArray[np.float64]]:
    """The soft-hue CELL_BINS histogram of each quarter (top-left, top-right, bottom-left, bottom-right; the first
    half of an odd side the smaller), square-rooted and halved, in one count over the picture: each bin counts its
    quarter's pixels in the order the quarter alone would, so the sums are those of four separate counts."""
    rows, cols = h0.shape
    cn, cs, cv = CELL_BINS
    cell = cn * cs * cv
    quarter = (np.arange(rows) >= rows // 2)[:, None] * 2 + (np.arange(cols) >= cols // 2)[None, :]
    counts = _soft_counts(h0, h1, frac, quarter * cell + (sat * cs >> 8) * cv + (val * cv >> 8), cs * cv, 4 * cell)
    return [np.sqrt(_normalised(c)) / 2 for c in counts.reshape(4, cell)]


def _soft_counts(h0: NDArray[np.int32], h1: NDArray[np.int32], frac: NDArray[np.float32], rest: NDArray[np.int32],
                 stride: int, n: int) -> NDArray[np.float64]:
    """Counts of ``n`` bins, each pixel's weight shared between bin ``rest + h0 * stride`` (1 - frac) and bin
    ``rest + h1 * stride`` (frac); pixels counted in row order."""
    rest, frac = rest.ravel(), frac.ravel()
    return (np.bincount(rest + h0.ravel() * stride, weights=1 - frac, minlength=n)
            + np.bincount(rest + h1.ravel() * stride, weights=frac, minlength=n))


def _normalised(counts: NDArray[np.float64]) -> NDArray[np.float64]:
    return counts / max(float(counts.sum()), 1e-12)
