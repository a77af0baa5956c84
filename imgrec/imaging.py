"""Decoding image bytes into an oriented RGB picture, with clear errors for what cannot be read."""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """A file or upload that is not a usable image; the message says why, in words for a person. ``kind``:
    "too_large" (over a size or pixel limit), "not_image" (not an image at all), or "unreadable" (damaged, ...)."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied, possibly reduced (JPEG draft) for speed
    width: int  # of the oriented original
    height: int
    format: str
    mode: str  # the file's own colour mode


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):  # transparency: composite over white
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_SRGB_TRANSFORMS: dict[tuple[bytes, str], object] = {}  # (profile digest, mode) -> ImageCms transform, or None
_SRGB_LOCK = threading.Lock()


def _srgb_transform(icc: bytes, mode: str) -> object | None:
    """A cached LittleCMS transform from an embedded profile to sRGB (None: the profile is sRGB already, or
    unusable: the pixels are then taken as they are)."""
    import hashlib

    key = (hashlib.blake2b(icc, digest_size=16).digest(), mode)
    with _SRGB_LOCK:
        if key in _SRGB_TRANSFORMS:
            return _SRGB_TRANSFORMS[key]
    from PIL import ImageCms

    transform = None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = (ImageCms.getProfileDescription(src) or "").strip().lower()
        if not name.startswith("srgb") and src.profile.xcolor_space.strip() == ("CMYK" if mode == "CMYK" else "RGB"):
            transform = ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB",
                                                renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                                flags=ImageCms.Flags.NOCACHE)  # NOCACHE: safe across threads
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        transform = None
    with _SRGB_LOCK:
        if len(_SRGB_TRANSFORMS) > 64:
            _SRGB_TRANSFORMS.clear()
        _SRGB_TRANSFORMS[key] = transform
    return transform


def to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """The pixels of an RGB or CMYK image in sRGB, by its embedded ICC profile (Adobe RGB, Display P3, a
    camera's); unchanged without a profile, with an sRGB one, or with one LittleCMS cannot use."""
    if not icc or img.mode not in ("RGB", "CMYK"):
        return img
    transform = _srgb_transform(icc, img.mode)
    if transform is None:
        return img
    from PIL import ImageCms

    try:
        return ImageCms.applyTransform(img, transform)  # type: ignore[arg-type]
    except (ImageCms.PyCMSError, ValueError):
        return img


def decode(data: bytes, *, max_pixels: int = 180_000_000, min_side: int | None = 256) -> Decoded:
    """Decode bytes to RGB with EXIF orientation applied and an embedded colour profile applied into sRGB (so the
    same picture saved in two colour spaces looks, and is measured, the same); only the first frame of animations
    is used.

    ``min_side`` lets JPEGs decode at a reduced scale (DCT draft mode) while keeping at least that many pixels on
    each side; ``None`` decodes at full size. Raises ImageError with the reason.
    """
    if not data:
        raise ImageError("empty file (0 bytes)", "not_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels: {w}x{h} is over the limit of {max_pixels:,}", "too_large")
            mode = img.mode
            if fmt == "JPEG" and min_side:
                img.draft("RGB", (min_side, min_side))
            img.seek(0)
            img.load()
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            icc = img.info.get("icc_profile")
            img = ImageOps.exif_transpose(img) or img
            if icc and img.mode == "CMYK":
                img = to_srgb(img, icc)
                icc = None
            rgb = _to_rgb(img)
            if icc and img.mode in ("RGB", "RGBA", "P"):
                rgb = to_srgb(rgb, icc)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb refused: {exc}", "too_large") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"decompression bomb refused: {exc}", "too_large") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError("not an image, or a format imgrec cannot read", "not_image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageError(f"corrupt or truncated image: {exc}") from exc
    except MemoryError as exc:
        raise ImageError("image too large to decode in memory", "too_large") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError("image has no pixels")
    return Decoded(image=rgb, width=w, height=h, format=fmt, mode=mode)


def read_file(path: str | os.PathLike[str], max_bytes: int | None = None, *, inside: str | None = None
              ) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its status after the read.

    Never blocks on a FIFO, socket or device given an image's name (opened non-blocking, refused unless regular), and
    refuses a file whose size or modification time changed while it was read (still being written). With
    ``inside`` (a resolved folder), the file actually opened (symlinks resolved after opening, so a link swapped in
    between a check and the read does not count) must lie inside it, else PermissionError. Raises OSError (gone, no
    permission, ...) or ImageError with the reason.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        if inside is not None:
            proc = f"/proc/self/fd/{fd}"
            real = os.readlink(proc) if os.path.islink(proc) else os.path.realpath(path)
            if os.path.commonpath([inside, real]) != inside:
                raise PermissionError(f"{path} is outside the collection's folder")
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ImageError("not a regular file (a FIFO, socket or device named like an image); not read")
        if max_bytes is not None and before.st_size > max_bytes:
            raise ImageError(f"file too large: {before.st_size:,} bytes is over the limit of {max_bytes:,}", "too_large")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise ImageError("the file changed while it was being read (still being written?); it is read again when "
                         "it changes")
    return data, after


def fit_within(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled to at most ``side`` px on its longer side (aspect kept, at least 1 px)."""
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def thumbnail_jpeg(img: Image.Image, size: int = 256, quality: int = 82) -> bytes:
    """A JPEG of at most ``size`` px on its longer side, for the UI."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
