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


def hsv_histogram(img: Image.Image, bins: tuple[int, int, int] = (8, 4, 4)) -> NDArray[np.float32]:
    """L1-normalised joint HSV histogram of an RGB image, flattened in (hue, saturation, value) order."""
    small = img if max(img.size) <= WORK_SIZE else img.resize(fit_within(img.size, WORK_SIZE), Image.Resampling.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.uint16).reshape(-1, 3)
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
