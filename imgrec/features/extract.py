"""The torch-free half of feature extraction, shared by ingestion workers and queries.

``extract(data)`` decodes once and computes everything that needs no model: metadata, colour histogram, hashes,
thumbnail, and the model's preprocessed input crop. The embedding is computed later, in batches, by the embedder.

One decode, one resize pyramid (``pyramid``): the decoded picture is resized once, to the model's shorter side;
the model's crop is cut from that copy, and the thumbnail, the colour copy and the hashes' input come from ever
smaller copies of it, never from the full picture again (four resizes of the full picture before: 2.6x less CPU,
``docs/performance.md``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgrec.features.color import WORK_SIZE, hsv_histogram, hsv_pixels, layout_descriptor
from imgrec.features.embed import ModelSpec, center_crop, model_level, strip_crop
from imgrec.features.hashing import dhash, phash
from imgrec.imaging import decode, fit_within, thumbnail_jpeg


@dataclass
class HandFeatures:
    width: int
    height: int
    format: str
    mode: str
    content_hash: str
    hist: NDArray[np.float32]
    phash: np.uint64
    dhash: np.uint64
    thumb: bytes | None
    crop: NDArray[np.uint8] | None  # the model's input, (S, S, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    layout: NDArray[np.float32] | None = None  # the colour layout descriptor (imgrec.features.color)
    emb: NDArray[np.float32] | None = None  # where a worker process embedded the crop (then dropped): unit vector
    top_i: NDArray[np.int16] | None = None  # ... its top-5 ImageNet classes
    top_p: NDArray[np.float32] | None = None  # ... and their probabilities

    @property
    def hashes(self) -> NDArray[np.uint64]:
        return np.array([self.phash, self.dhash], dtype=np.uint64)


@dataclass(frozen=True)
class Pyramid:
    """The copies of one decoded picture that the features are computed on, each made from the one before."""

    crop: NDArray[np.uint8] | None  # the model's input (from the model's resize of the picture)
    small: Image.Image  # at most ``small_side`` px per side: the thumbnail
    color: Image.Image  # at most WORK_SIZE px per side: the colour histogram's and the hashes' input


def pyramid(img: Image.Image, model: ModelSpec | None, small_side: int = 256) -> Pyramid:
    """One resize of the full picture (to the model's shorter side, as the model needs it), then smaller copies of
    that copy. A picture already smaller than a level is used as it is (never enlarged for the hand features)."""
    crop = None
    source = img
    if model is not None:
        level = model_level(img, model)
        if level is None:
            crop = strip_crop(img, model)
        else:
            crop = center_crop(level, model.crop)
            if level.width <= img.width and level.height <= img.height:  # a reduction: the smaller copies start here
                source = level
    small = _reduce(source, small_side)
    return Pyramid(crop, small, _reduce(small, WORK_SIZE))


def _reduce(img: Image.Image, side: int) -> Image.Image:
    if max(img.size) <= side:
        return img
    return img.resize(fit_within(img.size, side), Image.Resampling.BILINEAR, reducing_gap=2.0)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def extract(
    data: bytes,
    *,
    model: ModelSpec | None,
    bins: tuple[int, int, int] = (8, 4, 4),
    thumb_size: int | None = 256,
    max_pixels: int = 180_000_000,
    min_side: int = 256,
    layout: bool = True,
) -> HandFeatures:
    """Everything but the embedding, from the image's bytes. Raises ImageError for unreadable data.

    ``layout=False`` leaves out the colour layout (a query on an index that has none: 1.5 ms saved per image).

    ``min_side`` is the JPEG draft decoding size; ingestion and queries must use the same one (``decode_side``) so
    that the same file gives the same features.
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    chash = content_hash(data)
    dec = decode(data, max_pixels=max_pixels, min_side=min_side)
    t1 = time.perf_counter()
    t["decode"] = t1 - t0
    levels = pyramid(dec.image, model, thumb_size or 256)
    t2 = time.perf_counter()
    t["resize"] = t2 - t1
    hsv = hsv_pixels(levels.color)  # converted once for the histogram and the layout
    hist = hsv_histogram(hsv, bins)
    desc = layout_descriptor(hsv) if layout else None
    t3 = time.perf_counter()
    t["color"] = t3 - t2
    grey = levels.color.convert("L")  # once for both hashes (each resizes it to 32x32 or 9x8)
    ph, dh = phash(grey), dhash(grey)
    t4 = time.perf_counter()
    t["hash"] = t4 - t3
    thumb = thumbnail_jpeg(levels.small, thumb_size) if thumb_size else None
    t["thumbnail"] = time.perf_counter() - t4
    return HandFeatures(dec.width, dec.height, dec.format, dec.mode, chash, hist, ph, dh, thumb, levels.crop, t,
                        layout=desc)


def decode_side(model: ModelSpec) -> int:
    """The smallest side JPEGs are decoded at (libjpeg's DCT scaling: 1/2, 1/4, 1/8 of the size for a fraction of
    the work): 15/16 of the model's resize, so the model's input is enlarged by at most 7% (a 500x667 photo decodes
    at 250x334, 2.4x faster, and is resized to 256 on its shorter side; the thumbnail of a square photo may be a
    few pixels under 256)."""
    return max(64, -(-model.resize * 15 // 16))
