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

WORK_SIZE = 128  # the histogram is computed on a copy of at most this many pixels per side


def hsv_histogram(img: Image.Image, bins: tuple[int, int, int] = (8, 4, 4)) -> NDArray[np.float32]:
    """L1-normalised joint HSV histogram of an RGB image, flattened in (hue, saturation, value) order."""
    small = img if max(img.size) <= WORK_SIZE else img.resize(_fit(img.size, WORK_SIZE), Image.Resampling.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.uint16).reshape(-1, 3)
    nh, ns, nv = bins
    idx = (hsv[:, 0] * nh >> 8) * (ns * nv) + (hsv[:, 1] * ns >> 8) * nv + (hsv[:, 2] * nv >> 8)
    hist = np.bincount(idx, minlength=nh * ns * nv).astype(np.float32)
    return hist / max(float(hist.sum()), 1.0)


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))
