"""The torch-free half of feature extraction, shared by ingestion workers and queries.

``extract(data)`` decodes once and computes everything that needs no model: metadata, colour histogram, hashes,
thumbnail, and the model's preprocessed input crop. The embedding is computed later, in batches, by the Embedder.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from imgrec.features.color import hsv_histogram
from imgrec.features.embed import ModelSpec, preprocess
from imgrec.features.hashing import dhash, phash
from imgrec.imaging import decode, thumbnail_jpeg


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

    @property
    def hashes(self) -> NDArray[np.uint64]:
        return np.array([self.phash, self.dhash], dtype=np.uint64)


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
) -> HandFeatures:
    """Everything but the embedding, from the image's bytes. Raises ImageError for unreadable data.

    ``min_side`` is the JPEG draft decoding size; ingestion and queries must use the same one (``decode_side``) so
    that the same file gives the same features.
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    chash = content_hash(data)
    dec = decode(data, max_pixels=max_pixels, min_side=min_side)
    t1 = time.perf_counter()
    t["decode"] = t1 - t0
    hist = hsv_histogram(dec.image, bins)
    t2 = time.perf_counter()
    t["color"] = t2 - t1
    grey = dec.image.convert("L")  # once for both hashes (each converts its input to L: a copy for a grey one)
    ph, dh = phash(grey), dhash(grey)
    t3 = time.perf_counter()
    t["hash"] = t3 - t2
    thumb = thumbnail_jpeg(dec.image, thumb_size) if thumb_size else None
    t4 = time.perf_counter()
    t["thumbnail"] = t4 - t3
    crop = preprocess(dec.image, model) if model else None
    t["preprocess"] = time.perf_counter() - t4
    return HandFeatures(dec.width, dec.height, dec.format, dec.mode, chash, hist, ph, dh, thumb, crop, t)


def decode_side(thumb_size: int, model: ModelSpec) -> int:
    """The smallest side JPEGs are decoded at: enough for the thumbnail and the model's input."""
    return max(thumb_size, model.resize, 64)
