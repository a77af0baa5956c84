"""Unit tests for decoding (imgrec.imaging) and the torch-free feature extractors (colour, hashes, extract).

Every image is generated here with PIL / numpy and encoded in memory; no file is read from disk.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy.fft import dctn

from imgrec import imaging
from imgrec.features import hashing
from imgrec.features.color import hsv_histogram
from imgrec.features.embed import preprocess, spec
from imgrec.features.extract import HandFeatures, content_hash, decode_side, extract, pyramid
from imgrec.features.hashing import dhash, pack_bits, phash
from imgrec.imaging import ImageError, decode, fit_within, thumbnail_jpeg

# --- image generators -------------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reopen(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def smooth_noise(seed: int, size: tuple[int, int] = (320, 240), cells: int = 6) -> Image.Image:
    """Random colour blobs: a coarse random grid upsampled bicubically."""
    rng = np.random.default_rng(seed)
    small = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def texture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A blurred grey noise texture."""
    rng = np.random.default_rng(seed)
    a = (rng.random((size[1] // 4, size[0] // 4)) * 255).astype(np.uint8)
    img = Image.fromarray(a).resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    return img.convert("RGB")


def shapes(kind: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    img = Image.new("RGB", size, (30, 60, 200) if kind else (240, 230, 200))
    draw = ImageDraw.Draw(img)
    if kind == 0:
        draw.ellipse((40, 30, 200, 190), fill=(200, 30, 30))
        draw.rectangle((220, 120, 310, 230), fill=(20, 140, 40))
    else:
        draw.polygon([(160, 10), (310, 230), (10, 230)], fill=(250, 220, 40))
    return img


def rings(size: tuple[int, int] = (320, 240)) -> Image.Image:
    y, x = np.mgrid[: size[1], : size[0]]
    r = np.hypot(x - size[0] / 2, y - size[1] / 2)
    return Image.fromarray((np.cos(r / 12) * 127 + 128).astype(np.uint8)).convert("RGB")


# Visually distinct pictures with structure at several scales. (Pure linear gradients and regular stripes are left
# out of the robustness set: most of their low DCT coefficients / neighbour differences are ~0, so their hash bits
# are decided by rounding noise - a property of pHash / dHash themselves, not of the implementation.)
DISTINCT = {
    **{f"blobs{s}": (lambda s=s: smooth_noise(s)) for s in range(3)},
    **{f"texture{s}": (lambda s=s: texture(s)) for s in range(2)},
    "shapes0": lambda: shapes(0),
    "shapes1": lambda: shapes(1),
    "rings": rings,
}


@pytest.fixture(scope="module")
def distinct_images() -> dict[str, Image.Image]:
    return {name: make() for name, make in DISTINCT.items()}


def ham(a: np.uint64, b: np.uint64) -> int:
    return bin(int(a) ^ int(b)).count("1")


# --- colour histogram -------------------------------------------------------------------------------------------------


def hist_index(h: int, s: int, v: int, bins: tuple[int, int, int] = (8, 4, 4)) -> int:
    return (h * bins[1] + s) * bins[2] + v


@pytest.mark.parametrize(
    "rgb,expected_bin",
    [
        ((255, 0, 0), hist_index(0, 3, 3)),  # red: hue 0, full saturation, full value
        ((0, 255, 0), hist_index(2, 3, 3)),  # green: hue 120 deg -> bin 2 of 8 (45 deg each)
        ((0, 0, 255), hist_index(5, 3, 3)),  # blue: hue 240 deg -> bin 5
        ((255, 255, 255), hist_index(0, 0, 3)),  # white: no saturation, full value
        ((0, 0, 0), hist_index(0, 0, 0)),  # black
        ((160, 100, 100), hist_index(0, 1, 2)),  # dull red: s = 0.375, v = 0.63
    ],
)
def test_hsv_histogram_solid_colours(rgb, expected_bin):
    for size in ((40, 30), (500, 300)):  # below and above the working size
        h = hsv_histogram(solid(rgb, size))
        assert h.shape == (128,) and h.dtype == np.float32
        assert h.sum() == pytest.approx(1.0, abs=1e-6)
        assert h[expected_bin] == pytest.approx(1.0, abs=1e-6), (rgb, int(np.argmax(h)))


def test_hsv_histogram_pure_red_mass_in_one_bin():
    h = hsv_histogram(solid((255, 0, 0), (64, 64)))
    assert int(np.argmax(h)) == 15  # (hue 0, sat 3, value 3) in (8, 4, 4) row-major order
    assert float(h[15]) == 1.0
    assert np.count_nonzero(h) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hsv_histogram_normalised_and_128_bins(seed):
    for img in (smooth_noise(seed, (600, 400)), texture(seed, (97, 131)), smooth_noise(seed, (1, 1))):
        h = hsv_histogram(img)
        assert h.shape == (128,) and h.dtype == np.float32
        assert np.all(h >= 0)
        assert float(h.sum()) == pytest.approx(1.0, abs=1e-5)


def test_hsv_histogram_two_colours_split_mass():
    img = Image.new("RGB", (400, 300), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 200, 300))  # left half blue
    h = hsv_histogram(img)
    assert h[hist_index(0, 3, 3)] == pytest.approx(0.5, abs=0.02)
    assert h[hist_index(5, 3, 3)] == pytest.approx(0.5, abs=0.02)


def test_hsv_histogram_matches_colorsys_reference():
    """A per-pixel colorsys reference on an image small enough to be used as is (no resizing)."""
    img = smooth_noise(7, (96, 64))
    ref = np.zeros(128)
    for r, g, b in np.asarray(img).reshape(-1, 3).tolist():
        hh, ss, vv = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        ref[hist_index(min(int(hh * 8), 7), min(int(ss * 4), 3), min(int(vv * 4), 3))] += 1
    ref /= ref.sum()
    got = hsv_histogram(img)
    # PIL quantises H, S, V to 8 bits before binning: only pixels right at a bin edge may move to the next bin
    assert np.abs(got - ref).sum() < 0.03


def test_hsv_histogram_custom_bins_and_resize_stability():
    h = hsv_histogram(solid((255, 0, 0)), bins=(4, 2, 2))
    assert h.shape == (16,) and h[hist_index(0, 1, 1, (4, 2, 2))] == 1.0
    img = smooth_noise(3, (800, 600))
    full, half = hsv_histogram(img), hsv_histogram(img.resize((400, 300), Image.Resampling.BILINEAR))
    assert np.abs(full - half).sum() < 0.1
    assert fit_within((800, 600), 128) == (128, 96)
    assert fit_within((1, 5000), 128) == (1, 128)


# --- perceptual hashes ------------------------------------------------------------------------------------------------


def ref_pack(bits: list[bool]) -> int:
    value = 0
    for bit in bits:  # first bit most significant
        value = (value << 1) | int(bit)
    return value


def ref_phash(img: Image.Image) -> int:
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, type=2, norm="ortho")[:8, :8]  # scipy's orthonormal DCT-II, independent of _dct_matrix
    med = float(np.median(low))
    return ref_pack([float(low[i, j]) > med for i in range(8) for j in range(8)])


def ref_dhash(img: Image.Image) -> int:
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS)).tolist()
    return ref_pack([grey[r][c + 1] > grey[r][c] for r in range(8) for c in range(8)])


def _halves(top: tuple[int, int, int], bottom: tuple[int, int, int], size=(96, 64)) -> Image.Image:
    img = Image.new("RGB", size, bottom)
    img.paste(top, (0, 0, size[0], size[1] // 2))
    return img


def test_layout_descriptor_parts_and_norms():
    from imgrec.features.color import LAYOUT_DIMS, layout_descriptor

    d = layout_descriptor(_halves((40, 90, 220), (40, 170, 60)))
    assert d.shape == (LAYOUT_DIMS,) and d.dtype == np.float32 and (d >= 0).all()
    colours, patches = d[: 128 + 4 * 72], d[128 + 4 * 72 :]
    assert np.linalg.norm(colours) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(patches) == pytest.approx(1.0, abs=1e-5)
    # two flat colours: every pixel's neighbour has its colour except along one seam, at every distance
    assert patches.max() == pytest.approx(patches[patches > 0].min(), rel=0.2)
    assert np.array_equal(d, layout_descriptor(_halves((40, 90, 220), (40, 170, 60))))  # deterministic


def test_layout_descriptor_sees_where_colours_are_and_how_they_clump():
    from imgrec.features.color import layout_descriptor

    sky = layout_descriptor(_halves((40, 90, 220), (40, 170, 60)))  # blue above green
    upside = layout_descriptor(_halves((40, 170, 60), (40, 90, 220)))  # the same colours, the other way up
    assert np.allclose(hsv_histogram(_halves((40, 90, 220), (40, 170, 60))),
                       hsv_histogram(_halves((40, 170, 60), (40, 90, 220))))  # the histogram cannot tell them apart
    assert float(sky @ upside) < 0.85 * float(sky @ sky)
    # the same two colours as a fine checkerboard: the same histogram, no patches at all
    yy, xx = np.mgrid[0:64, 0:96]
    board = np.where(((yy + xx) % 2 == 0)[..., None], np.uint8([40, 90, 220]), np.uint8([40, 170, 60]))
    fine = layout_descriptor(Image.fromarray(board.astype(np.uint8)))
    assert float(sky[-512:] @ fine[-512:]) < 0.8
    # a slightly different shade stays close (soft hue bins)
    shade = layout_descriptor(_halves((45, 95, 225), (45, 175, 65)))
    assert float(sky @ shade) > 0.95


def _reference_layout(img: Image.Image) -> np.ndarray:
    """The colour layout computed part by part, each quarter sliced and counted on its own (the definition)."""
    from imgrec.features.color import CELL_BINS, CORRELOGRAM_DISTANCES, LAYOUT_BINS, _correlogram, hsv_pixels

    def _soft_hue_histogram(h, s, v, bins):  # hue shared between the two nearest hue bins, L1-normalised
        nh, ns, nv = bins
        pos = h * np.float32(nh / 256.0) - np.float32(0.5)
        lo = np.floor(pos)
        frac = pos - lo
        h0 = lo.astype(np.int32) % nh
        rest = (s.astype(np.int32) * ns >> 8) * nv + (v.astype(np.int32) * nv >> 8)
        out = (np.bincount(h0 * ns * nv + rest, weights=1 - frac, minlength=nh * ns * nv)
               + np.bincount((h0 + 1) % nh * ns * nv + rest, weights=frac, minlength=nh * ns * nv))
        return out / max(float(out.sum()), 1e-12)

    a = hsv_pixels(img)
    h = a[..., 0].astype(np.float32)
    rows, cols = a.shape[:2]
    whole = np.sqrt(_soft_hue_histogram(h.ravel(), a[..., 1].ravel(), a[..., 2].ravel(), LAYOUT_BINS))
    quarters = []
    for i in range(2):
        for j in range(2):
            r = slice(i * rows // 2, max((i + 1) * rows // 2, i * rows // 2 + 1))
            c = slice(j * cols // 2, max((j + 1) * cols // 2, j * cols // 2 + 1))
            q = a[r, c]
            quarters.append(np.sqrt(_soft_hue_histogram(h[r, c].ravel(), q[..., 1].ravel(), q[..., 2].ravel(),
                                                        CELL_BINS)) / 2)
    colours = np.concatenate([whole, *quarters])
    colours /= max(float(np.linalg.norm(colours)), 1e-12)
    x = a.astype(np.int32)
    codes = (x[..., 0] * 8 >> 8) * 16 + (x[..., 1] * 4 >> 8) * 4 + (x[..., 2] * 4 >> 8)
    patches = np.sqrt(_correlogram(codes, 128, CORRELOGRAM_DISTANCES))
    patches /= max(float(np.linalg.norm(patches)), 1e-12)
    return np.concatenate([colours, patches]).astype(np.float32)


@pytest.mark.parametrize("size", [(96, 64), (128, 85), (33, 127), (1, 40), (40, 1), (1, 1), (2, 3)])
def test_layout_descriptor_equals_its_definition_bit_for_bit(size):
    """The one-count-for-all-quarters computation gives exactly the part-by-part descriptor (odd sizes, 1 px)."""
    from imgrec.features.color import hsv_pixels, layout_descriptor

    for seed in range(3):
        rng = np.random.default_rng(seed)
        smooth = rng.integers(0, 256, (max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
        img = Image.fromarray(smooth).resize(size, Image.Resampling.BILINEAR)  # patches, not noise
        ref = _reference_layout(img)
        assert np.array_equal(layout_descriptor(img), ref)
        assert np.array_equal(layout_descriptor(hsv_pixels(img)), ref)  # the HSV pixels given, as extract does


def test_hsv_histogram_of_an_image_or_its_hsv_pixels_is_the_same():
    from imgrec.features.color import hsv_pixels

    img = smooth_noise(3, (300, 200))
    assert np.array_equal(hsv_histogram(img), hsv_histogram(hsv_pixels(img)))
    assert np.array_equal(hsv_histogram(img, (4, 2, 2)), hsv_histogram(hsv_pixels(img), (4, 2, 2)))


def test_pack_bits_order_and_top_bit():
    bits = np.zeros(64, bool)
    bits[0] = True
    assert int(pack_bits(bits)) == 1 << 63
    bits = np.zeros(64, bool)
    bits[-1] = True
    assert int(pack_bits(bits)) == 1
    assert int(pack_bits(np.ones((8, 8), bool))) == 2**64 - 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = rng.random(64) < 0.5
        packed = pack_bits(b)
        assert isinstance(packed, np.uint64)
        assert int(packed) == ref_pack(b.tolist())


@pytest.mark.parametrize("name", list(DISTINCT))
def test_hashes_match_reference_and_are_uint64(name, distinct_images):
    img = distinct_images[name]
    for fn, ref in ((phash, ref_phash), (dhash, ref_dhash)):
        h = fn(img)
        assert isinstance(h, np.uint64)
        assert int(h) == ref(img), fn.__name__
        assert fn(img.copy()) == h  # deterministic
        assert fn(DISTINCT[name]()) == h  # and the same for an independently generated copy


def test_phash_dct_matrix_is_orthonormal():
    d = hashing._dct_matrix(32)
    np.testing.assert_allclose(d @ d.T, np.eye(32), atol=1e-12)


def test_phash_top_bit_set_for_natural_images(distinct_images):
    # the DC coefficient is the largest, so the first (most significant) bit is set: uint64 above 2**63
    for img in distinct_images.values():
        assert int(phash(img)) >> 63 == 1


@pytest.mark.parametrize("name", list(DISTINCT))
def test_hashes_robust_to_resize_and_jpeg(name, distinct_images):
    img = distinct_images[name]
    variants = {
        "half": img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR),
        "double": img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC),
        "jpeg60": reopen(encode(img, "JPEG", quality=60)),
        "half+jpeg60": reopen(encode(img.resize((img.width // 2, img.height // 2)), "JPEG", quality=60)),
    }
    for label, v in variants.items():
        assert ham(phash(img), phash(v)) <= 8, (label, "phash")
        assert ham(dhash(img), dhash(v)) <= 10, (label, "dhash")


def test_hashes_far_apart_for_distinct_images(distinct_images):
    for (a, ia), (b, ib) in itertools.combinations(distinct_images.items(), 2):
        assert ham(phash(ia), phash(ib)) > 20, (a, b, "phash")
        assert ham(dhash(ia), dhash(ib)) > 20, (a, b, "dhash")


def test_hashes_of_flipped_image_differ(distinct_images):
    img = distinct_images["shapes0"]
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert ham(phash(img), phash(flipped)) > 8
    assert ham(dhash(img), dhash(flipped)) > 8


# --- decoding ---------------------------------------------------------------------------------------------------------


def quadrants(size: tuple[int, int] = (300, 200)) -> Image.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right white."""
    w, h = size
    img = Image.new("RGB", size)
    img.paste((255, 0, 0), (0, 0, w // 2, h // 2))
    img.paste((0, 255, 0), (w // 2, 0, w, h // 2))
    img.paste((0, 0, 255), (0, h // 2, w // 2, h))
    img.paste((255, 255, 255), (w // 2, h // 2, w, h))
    return img


def colour_at(img: Image.Image, fx: float, fy: float) -> np.ndarray:
    return np.asarray(img)[int(fy * img.height), int(fx * img.width)].astype(int)


def assert_colour(got: np.ndarray, expected: tuple[int, int, int], tol: int = 12) -> None:
    assert np.all(np.abs(got - np.array(expected)) <= tol), (got.tolist(), expected)


def test_decode_plain_rgb_png_and_jpeg():
    img = quadrants()
    for fmt in ("PNG", "JPEG"):
        dec = decode(encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})), min_side=None)
        assert isinstance(dec, imaging.Decoded)
        assert (dec.width, dec.height, dec.format, dec.mode) == (300, 200, fmt, "RGB")
        assert dec.image.mode == "RGB" and dec.image.size == (300, 200)
        assert_colour(colour_at(dec.image, 0.25, 0.25), (255, 0, 0))


@pytest.mark.parametrize("min_side", [None, 256])
def test_decode_applies_exif_orientation(min_side):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = encode(quadrants((300, 200)), "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (300, 200)
    dec = decode(data, min_side=min_side)
    assert (dec.width, dec.height) == (200, 300)  # swapped
    assert dec.image.size == (200, 300)
    # 90 degrees clockwise: stored bottom-left (blue) -> top-left, top-left (red) -> top-right,
    # top-right (green) -> bottom-right, bottom-right (white) -> bottom-left
    assert_colour(colour_at(dec.image, 0.25, 0.25), (0, 0, 255))
    assert_colour(colour_at(dec.image, 0.75, 0.25), (255, 0, 0))
    assert_colour(colour_at(dec.image, 0.75, 0.75), (0, 255, 0))
    assert_colour(colour_at(dec.image, 0.25, 0.75), (255, 255, 255))


def test_decode_exif_orientation_3_keeps_size_and_rotates_180():
    exif = Image.Exif()
    exif[0x0112] = 3
    dec = decode(encode(quadrants((300, 200)), "JPEG", quality=95, exif=exif), min_side=None)
    assert (dec.width, dec.height) == (300, 200)
    assert_colour(colour_at(dec.image, 0.25, 0.25), (255, 255, 255))
    assert_colour(colour_at(dec.image, 0.75, 0.75), (255, 0, 0))


def test_decode_rgba_composites_over_white():
    arr = np.zeros((10, 30, 4), np.uint8)
    arr[:, :10] = (255, 0, 0, 255)  # opaque red
    arr[:, 10:20] = (0, 0, 255, 0)  # fully transparent blue
    arr[:, 20:] = (0, 0, 0, 128)  # half-transparent black
    dec = decode(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert dec.mode == "RGBA" and dec.image.mode == "RGB"
    px = np.asarray(dec.image).astype(int)
    assert px[5, 5].tolist() == [255, 0, 0]
    assert px[5, 15].tolist() == [255, 255, 255]
    assert np.all(np.abs(px[5, 25] - 127) <= 1)


def test_decode_palette_with_transparency():
    img = Image.new("P", (20, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (10, 0, 20, 10))  # right half: palette entry 1 (blue)
    data = encode(img, "PNG", transparency=0)  # entry 0 (red) is transparent
    dec = decode(data)
    assert dec.mode == "P" and dec.image.mode == "RGB"
    px = np.asarray(dec.image)
    assert px[5, 2].tolist() == [255, 255, 255]  # transparent -> white, not red
    assert px[5, 15].tolist() == [0, 0, 255]


def test_decode_palette_without_transparency():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    dec = decode(encode(img, "PNG"))
    assert np.asarray(dec.image)[3, 3].tolist() == [10, 200, 30]


def test_decode_greyscale_l_and_la():
    dec = decode(encode(Image.new("L", (12, 9), 100), "PNG"))
    assert dec.mode == "L" and dec.image.mode == "RGB" and dec.image.size == (12, 9)
    assert np.all(np.asarray(dec.image) == 100)
    dec = decode(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"))  # transparent black -> white
    assert np.all(np.asarray(dec.image) == 255)


def test_decode_16bit_grey_png():
    arr = np.array([[0, 32768, 65535, 4096]] * 5, dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    dec = decode(data)
    assert dec.image.mode == "RGB" and dec.image.size == (4, 5)
    px = np.asarray(dec.image).astype(int)
    assert np.all(px[:, :, 0] == px[:, :, 1]) and np.all(px[:, :, 1] == px[:, :, 2])
    row = px[2, :, 0]
    assert row[0] == 0 and row[2] == 255
    assert abs(row[1] - 128) <= 1  # scaled by 255/65535, not clipped to 255
    assert abs(row[3] - 16) <= 1


def test_decode_cmyk_jpeg():
    img = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # red in CMYK
    img.paste((255, 0, 0, 0), (32, 0, 64, 48))  # cyan
    dec = decode(encode(img, "JPEG", quality=95))
    assert dec.mode == "CMYK" and dec.format == "JPEG" and dec.image.mode == "RGB"
    assert_colour(colour_at(dec.image, 0.2, 0.5), (255, 0, 0))
    assert_colour(colour_at(dec.image, 0.8, 0.5), (0, 255, 255))


def _quadrants() -> Image.Image:
    a = np.zeros((96, 128, 3), np.uint8)
    a[:48, :64], a[:48, 64:], a[48:, :64], a[48:, 64:] = (220, 30, 40), (30, 200, 60), (40, 60, 210), (240, 200, 30)
    a[40:56] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None]  # a grey ramp across the middle
    return Image.fromarray(a)


def _in_adobe_rgb(img: Image.Image) -> tuple[Image.Image, bytes]:
    """The same picture as Adobe RGB pixels (the colours a camera set to Adobe RGB would save), and the profile."""
    from icc import matrix_profile
    from PIL import ImageCms

    icc = matrix_profile()
    t = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                "RGB", "RGB")
    out = ImageCms.applyTransform(img, t)
    out.info.pop("icc_profile", None)  # the pixels alone: each test says whether the file carries the profile
    return out, icc


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_applies_an_embedded_profile_into_srgb(fmt: str) -> None:
    original = _quadrants()
    adobe, icc = _in_adobe_rgb(original)
    kw = {"quality": 97, "subsampling": 0} if fmt == "JPEG" else {}
    srgb_file, adobe_file = encode(original, fmt, **kw), encode(adobe, fmt, icc_profile=icc, **kw)
    ref = np.asarray(decode(srgb_file, min_side=None).image, dtype=np.float32)
    got = np.asarray(decode(adobe_file, min_side=None).image, dtype=np.float32)
    ignored = np.asarray(decode(encode(adobe, fmt, **kw), min_side=None).image, dtype=np.float32)
    assert np.abs(ignored - ref).mean() > 8  # the two files' pixel values differ: the profile matters
    assert np.abs(got - ref).mean() < 2.0  # ... and applied, the same picture comes out
    # and so do its colour features (the histogram and the colour layout) and its thumbnail
    from imgrec.features.color import layout_descriptor

    def feats(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = extract(data, model=None, thumb_size=64)
        return f.hist, f.layout, np.asarray(Image.open(io.BytesIO(f.thumb)), dtype=np.float32)

    (h0, l0, t0), (h1, l1, t1), (h2, _, _) = feats(srgb_file), feats(adobe_file), feats(encode(adobe, fmt, **kw))
    assert np.abs(h1 - h0).sum() < 0.5 * np.abs(h2 - h0).sum()
    assert float(l1 @ l0) / (np.linalg.norm(l1) * np.linalg.norm(l0)) > 0.99
    assert np.abs(t1 - t0).mean() < 3.0
    assert l0.shape == layout_descriptor(original).shape


def test_decode_keeps_pixels_with_an_srgb_or_unusable_profile() -> None:
    from PIL import ImageCms

    original = _quadrants()
    ref = np.asarray(original, dtype=np.int16)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, b"not a colour profile at all", b"\0" * 200):
        dec = decode(encode(original, "PNG", icc_profile=icc), min_side=None)
        assert np.abs(np.asarray(dec.image, dtype=np.int16) - ref).max() <= 1, icc[:20]


def test_decode_animated_gif_first_frame():
    frames = [solid(c, (16, 16)) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    dec = decode(data)
    assert dec.format == "GIF" and dec.image.size == (16, 16)
    assert np.all(np.asarray(dec.image) == (255, 0, 0))


def test_decode_jpeg_draft_reduces_but_reports_original_size():
    img = smooth_noise(1, (1600, 1200))
    data = encode(img, "JPEG", quality=90)
    dec = decode(data, min_side=256)
    assert (dec.width, dec.height) == (1600, 1200)
    assert min(dec.image.size) >= 256 and dec.image.size[0] < 1600
    full = decode(data, min_side=None)
    assert full.image.size == (1600, 1200)


def test_decode_error_empty():
    with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
        decode(b"")


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_error_random_bytes(seed):
    data = np.random.default_rng(seed).bytes(5000)
    with pytest.raises(ImageError, match="not an image"):
        decode(data)
    with pytest.raises(ImageError, match="not an image"):
        decode(b"hello, this is text and not a picture")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_error_truncated(fmt):
    data = encode(texture(0, (300, 200)), fmt)
    for cut in (len(data) // 2, len(data) - 200):
        with pytest.raises(ImageError, match="corrupt or truncated image"):
            decode(data[:cut], min_side=None)


def test_decode_error_max_pixels():
    data = encode(solid((1, 2, 3), (64, 48)))
    with pytest.raises(ImageError, match=r"too many pixels: 64x48 is over the limit of 1,000"):
        decode(data, max_pixels=1000)
    assert decode(data, max_pixels=64 * 48).width == 64  # exactly at the limit is fine


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares a huge size (a classic decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1), 0), "PNG"))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_decode_error_declared_bomb():
    data = _png_with_declared_size(30_000, 30_000)
    assert struct.unpack(">II", data[16:24]) == (30_000, 30_000)
    with pytest.raises(ImageError, match="too many pixels|decompression bomb"):
        decode(data)
    # below Pillow's own limit, the declared size is checked against max_pixels before any pixel is decoded
    data = _png_with_declared_size(5_000, 4_000)
    with pytest.raises(ImageError, match=r"too many pixels: 5000x4000 is over the limit of 1,000,000"):
        decode(data, max_pixels=1_000_000)


def test_decode_error_pillow_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(solid((9, 9, 9), (40, 40)))  # 1600 px: above PIL's warning limit -> refused, not a warning
    with pytest.raises(ImageError, match="decompression bomb refused"):
        decode(data)
    data = encode(solid((9, 9, 9), (100, 100)))  # above twice the limit: PIL's own error
    with pytest.raises(ImageError, match="decompression bomb refused"):
        decode(data)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_thumbnail_jpeg():
    thumb = thumbnail_jpeg(smooth_noise(0, (1000, 500)))
    img = Image.open(io.BytesIO(thumb))
    assert img.format == "JPEG" and img.size == (256, 128)
    small = Image.open(io.BytesIO(thumbnail_jpeg(solid((1, 2, 3), (100, 80)))))
    assert small.size == (100, 80)  # never enlarged


# --- extract ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return spec("efficientnet-lite0")


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (100, 80)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_extract_all_features(lite0, size, fmt):
    img = smooth_noise(2, size)
    data = encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    side = decode_side(lite0)
    f = extract(data, model=lite0, min_side=side)
    assert isinstance(f, HandFeatures)
    assert (f.width, f.height, f.format, f.mode) == (*size, fmt, "RGB")
    assert f.content_hash == content_hash(data)
    # colour
    assert f.hist.shape == (128,) and f.hist.dtype == np.float32
    assert float(f.hist.sum()) == pytest.approx(1.0, abs=1e-5)
    # one resize pyramid: the model's crop from the model's resize of the decoded picture, the thumbnail from a copy
    # of that copy (never enlarged), the colour histogram and the hashes from a copy of at most 128 px of that one
    dec = decode(data, min_side=side)
    levels = pyramid(dec.image, lite0)
    assert max(levels.small.size) == min(256, max(dec.image.size)) and max(levels.color.size) <= 128
    assert isinstance(f.phash, np.uint64) and isinstance(f.dhash, np.uint64)
    assert f.phash == phash(levels.color) and f.dhash == dhash(levels.color)
    np.testing.assert_array_equal(f.hist, hsv_histogram(levels.color))
    assert f.hashes.dtype == np.uint64 and f.hashes.tolist() == [int(f.phash), int(f.dhash)]
    # ... close to the same features of the full picture (what they were computed on before the pyramid)
    assert np.abs(f.hist - hsv_histogram(dec.image)).sum() < 0.15
    assert sum(bin(int(a) ^ int(b)).count("1") for a, b in ((f.phash, phash(dec.image)), (f.dhash, dhash(dec.image)))) <= 8
    # thumbnail: a decodable JPEG of at most 256 px, never enlarged
    thumb = Image.open(io.BytesIO(f.thumb))
    thumb.load()
    assert thumb.format == "JPEG"
    assert max(thumb.size) == min(256, max(dec.image.size))
    # the model's input crop: exactly the model's preprocessing of the decoded picture
    assert f.crop is not None and f.crop.shape == (224, 224, 3) and f.crop.dtype == np.uint8
    np.testing.assert_array_equal(f.crop, preprocess(dec.image, lite0))
    assert set(f.timings) == {"decode", "resize", "color", "hash", "thumbnail"}
    assert all(t >= 0 for t in f.timings.values())


def test_extract_without_model_or_thumbnail():
    data = encode(texture(1, (200, 150)))
    f = extract(data, model=None, thumb_size=None)
    assert f.crop is None and f.thumb is None
    assert f.hist.shape == (128,)


def test_extract_deterministic_and_orientation(lite0):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(smooth_noise(4, (400, 300)), "JPEG", quality=90, exif=exif)
    a, b = extract(data, model=lite0), extract(data, model=lite0)
    assert (a.width, a.height) == (300, 400)
    assert a.content_hash == b.content_hash and a.phash == b.phash and a.dhash == b.dhash
    np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_array_equal(a.crop, b.crop)
    assert Image.open(io.BytesIO(a.thumb)).size == (192, 256)


def test_extract_raises_image_error(lite0):
    with pytest.raises(ImageError):
        extract(b"not an image", model=lite0)
    with pytest.raises(ImageError, match="too many pixels"):
        extract(encode(solid((0, 0, 0), (50, 50))), model=lite0, max_pixels=100)


def test_content_hash():
    a = encode(solid((10, 20, 30)))
    b = encode(solid((10, 20, 31)))
    assert content_hash(a) == content_hash(bytes(a))
    assert content_hash(a) != content_hash(b)
    assert content_hash(a) != content_hash(a + b"\0")
    assert content_hash(a) == hashlib.blake2b(a, digest_size=16).hexdigest()
    assert len(content_hash(a)) == 32 and int(content_hash(a), 16) >= 0
    # the same picture, encoded differently, is different content
    img = smooth_noise(0, (64, 64))
    assert content_hash(encode(img, "PNG")) != content_hash(encode(img, "JPEG"))

