"""Perceptual hashes, 64 bits each, packed into uint64: pHash (DCT) and dHash (gradient)."""

from __future__ import annotations

from functools import cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image


@cache
def _dct_matrix(n: int) -> NDArray[np.float64]:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def pack_bits(bits: NDArray[np.bool_]) -> np.uint64:
    """64 booleans (row-major, first bit most significant) -> one uint64."""
    return np.frombuffer(np.packbits(bits.reshape(-1)[:64]).tobytes(), dtype=">u8")[0].astype(np.uint64)


def phash(img: Image.Image) -> np.uint64:
    """pHash: grey 32x32, 2-D DCT, the 8x8 lowest frequencies compared with their median."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(32)
    low = (d @ grey @ d.T)[:8, :8]
    return pack_bits(low > np.median(low))


def dhash(img: Image.Image) -> np.uint64:
    """dHash: grey 9x8, each pixel compared with its right neighbour."""
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return pack_bits(grey[:, 1:] > grey[:, :-1])
