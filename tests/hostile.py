"""A corpus of odd and hostile files, made on the spot, each kind with the outcome imgrec must give it.

``make_corpus(folder)`` writes every kind below ``folder`` and returns the list of ``Kind``s: what the files are, and
whether each must be ingested (with its size as shown, and a colour check on what the lake stores) or recorded as
skipped with a reason matching a pattern, or left out without a record (not an image by its name). Used by
tests/test_hostile.py for ingestion and for uploads in the app; the table in docs/reliability.md lists the same kinds.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RED, GREEN, BLUE, YELLOW, WHITE = (220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 220, 40), (255, 255, 255)
QUADRANTS = (RED, GREEN, BLUE, YELLOW)  # top-left, top-right, bottom-left, bottom-right, as a viewer shows them
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files without read permission


@dataclass
class Kind:
    name: str
    what: str  # for the table in docs/reliability.md
    files: list[str]  # paths relative to the corpus folder
    outcome: str  # "ingested", "skipped" or "ignored"
    reason: str = ""  # skipped: a regular expression the recorded reason must match
    size: tuple[int, int] | None = None  # ingested: width x height as shown (orientation applied)
    colours: list[tuple[tuple[float, float], tuple[int, int, int]]] = field(default_factory=list)  # (x, y) -> rgb
    upload: bool = True  # its bytes can be uploaded (not a link, FIFO, socket, missing or 1 GiB file)
    expect_format: str | None = None


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def quadrants(size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """A picture of four coloured blocks (red top-left, green top-right, blue bottom-left, yellow bottom-right)."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2:] = RED, GREEN
    a[h // 2:, : w // 2], a[h // 2:, w // 2:] = BLUE, YELLOW
    return a


QUAD_CHECK = [((0.25, 0.25), RED), ((0.75, 0.25), GREEN), ((0.25, 0.75), BLUE), ((0.75, 0.75), YELLOW)]


def stored_for_orientation(shown: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that a viewer applying EXIF ``orientation`` shows ``shown``.

    From the EXIF definition of where row 0 / column 0 of the stored image are (not from Pillow's code): 2 mirrored,
    3 rotated 180, 4 flipped, 5 transposed, 6 to be rotated 90 degrees clockwise to show, 7 transversed, 8 to be
    rotated 90 degrees counter-clockwise.
    """
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, 1),  # shown = stored rotated clockwise, so stored = shown rotated counter-clockwise
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, -1),
    }[orientation](shown).copy()


def exif_orientation(orientation: int) -> bytes:
    """Raw EXIF (APP1 payload): a little-endian TIFF header and one IFD entry, Orientation (0x0112) = value."""
    ifd = struct.pack("<HHHIHH", 1, 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding ``payload`` right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def png_chunks(width: int, height: int, depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (for what Pillow does not write: 16-bit RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows)) + chunk(b"IEND", b"")


def png_16bit_rgb(rgb8: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    w, h = size
    px = np.zeros((h, w, 3), ">u2")
    px[:] = [c * 257 for c in rgb8]
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    return png_chunks(w, h, 16, 2, rows)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge size (a decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1), 0), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1), 0), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def ycck_jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A 4-component Adobe JPEG with transform 2 (YCCK), as Photoshop writes CMYK: Y, Cb, Cr of the colour and K."""
    y, cb, cr = Image.new("RGB", size, rgb).convert("YCbCr").split()
    data = bytearray(encode(Image.merge("CMYK", (y, cb, cr, Image.new("L", size, 0))), "JPEG", quality=95))
    at = data.find(b"Adobe")
    assert at > 0
    data[at + 11] = 2  # APP14 "Adobe", version, flags0, flags1, transform
    return bytes(data)


def two_frames(fmt: str) -> bytes:
    frames = [Image.new("RGB", (48, 32), RED), Image.new("RGB", (48, 32), BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def make_corpus(folder: Path, outside: Path | None = None) -> list[Kind]:
    """Write every kind of odd file below ``folder`` (``outside``: a folder beside it, for a link that leaves it)."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds: list[Kind] = []

    def put(rel: str, data: bytes) -> str:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel

    def add(name: str, what: str, files: list[str], outcome: str, **kw: object) -> None:
        kinds.append(Kind(name, what, files, outcome, **kw))  # type: ignore[arg-type]

    photo = Image.fromarray(quadrants())
    jpeg = encode(photo, "JPEG", quality=95)
    png = encode(photo, "PNG")
    webp = encode(photo, "WEBP", quality=90)

    # --- not images, or broken ones: skipped with a reason ---------------------------------------------------------
    add("zero_bytes", "an empty file (0 bytes)", [put("bad/empty.jpg", b"")], "skipped", reason="empty file")
    add("truncated_jpeg", "a JPEG cut in half", [put("bad/cut.jpg", jpeg[: len(jpeg) // 2])], "skipped",
        reason="corrupt or truncated")
    add("truncated_png", "a PNG cut in half", [put("bad/cut.png", png[: len(png) // 2])], "skipped",
        reason="corrupt or truncated")
    add("truncated_webp", "a WebP cut in half", [put("bad/cut.webp", webp[: len(webp) // 2])], "skipped",
        reason="corrupt or truncated|not an image")
    add("header_only_jpeg", "a JPEG of only its start and end markers", [put("bad/markers.jpg", b"\xff\xd8\xff\xd9")],
        "skipped", reason="corrupt or truncated|not an image")
    add("random_bytes", "4 kB of random bytes named .jpg",
        [put("bad/noise.jpg", np.random.default_rng(7).bytes(4096))], "skipped", reason="not an image")
    add("html_page", "an HTML page named .png (a saved error page)",
        [put("bad/page.png", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n")], "skipped",
        reason="not an image")
    add("decompression_bomb", "a 60-byte PNG declaring 30000 x 30000 px, a GIF declaring 65535 x 65535",
        [put("bad/bomb.png", png_declaring(30_000, 30_000)), put("bad/bomb.gif", gif_declaring(65_535, 65_535))],
        "skipped", reason="too many pixels|decompression bomb")
    big = folder / "bad" / "huge.tif"  # sparse: no disk used, never read
    with open(big, "wb") as fh:
        fh.truncate(1024**3 + 1)
    add("oversized_file", "a 1 GiB + 1 byte file named .tif (sparse; a video or disk image)", ["bad/huge.tif"],
        "skipped", reason="file too large", upload=False)

    # --- sizes and pixel formats: ingested, right size, right colours -------------------------------------------
    add("one_pixel", "a 1 x 1 px PNG", [put("ok/one.png", encode(Image.new("RGB", (1, 1), GREEN), "PNG"))],
        "ingested", size=(1, 1), colours=[((0.5, 0.5), GREEN)])
    strip = np.zeros((20, 20000, 3), np.uint8)
    strip[:] = BLUE
    add("strip_20000x20", "a 20000 x 20 px panorama strip (JPEG)",
        [put("ok/strip.jpg", encode(Image.fromarray(strip), "JPEG", quality=90))], "ingested", size=(20000, 20),
        colours=[((0.5, 0.5), BLUE)])
    add("strip_100000x1", "a 100000 x 1 px PNG (resizing it whole for the model once took 10 GB)",
        [put("ok/line.png", encode(Image.new("RGB", (100_000, 1), YELLOW), "PNG"))], "ingested", size=(100_000, 1),
        colours=[((0.5, 0.5), YELLOW)])
    grey16 = np.full((30, 40), 0x8080, np.uint16)
    add("png_16bit_grey", "a 16-bit greyscale PNG (I;16)", [put("ok/grey16.png", encode(Image.fromarray(grey16), "PNG"))],
        "ingested", size=(40, 30), colours=[((0.5, 0.5), (128, 128, 128))])
    add("png_16bit_rgb", "a 16-bit-per-channel RGB PNG (written by hand)", [put("ok/rgb16.png", png_16bit_rgb(RED))],
        "ingested", size=(40, 30), colours=[((0.5, 0.5), RED)])
    add("cmyk_jpeg", "a CMYK JPEG (Adobe, no colour profile)",
        [put("ok/cmyk.jpg", encode(photo.convert("CMYK"), "JPEG", quality=95))], "ingested", size=(96, 64),
        colours=QUAD_CHECK)
    add("ycck_jpeg", "a YCCK JPEG (Adobe transform 2, as Photoshop saves CMYK)",
        [put("ok/ycck.jpg", ycck_jpeg(RED))], "ingested", size=(64, 48), colours=[((0.5, 0.5), RED)])
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([*GREEN, *BLUE] + [0] * 762)
    ImageDraw.Draw(pal).rectangle((20, 0, 39, 29), fill=1)
    add("palette_transparency", "a palette PNG whose left half is transparent (tRNS)",
        [put("ok/palette.png", encode(pal, "PNG", transparency=0))], "ingested", size=(40, 30),
        colours=[((0.25, 0.5), WHITE), ((0.75, 0.5), BLUE)])
    la = Image.merge("LA", (Image.new("L", (40, 30), 40), Image.new("L", (40, 30), 0)))
    ImageDraw.Draw(la).rectangle((20, 0, 39, 29), fill=(40, 255))
    add("la_alpha", "a grey + alpha PNG, left half transparent", [put("ok/la.png", encode(la, "PNG"))], "ingested",
        size=(40, 30), colours=[((0.25, 0.5), WHITE), ((0.75, 0.5), (40, 40, 40))])
    rgba = Image.new("RGBA", (40, 30), (*RED, 0))
    ImageDraw.Draw(rgba).rectangle((20, 0, 39, 29), fill=(*RED, 255))
    add("rgba_alpha", "an RGBA PNG, left half transparent, and the same as WebP",
        [put("ok/rgba.png", encode(rgba, "PNG")), put("ok/rgba.webp", encode(rgba, "WEBP", lossless=True))],
        "ingested", size=(40, 30), colours=[((0.25, 0.5), WHITE), ((0.75, 0.5), RED)])
    add("animated_gif", "an animated GIF (red, then blue): the first frame", [put("ok/anim.gif", two_frames("GIF"))],
        "ingested", size=(48, 32), colours=[((0.5, 0.5), RED)])
    add("animated_webp", "an animated WebP (red, then blue): the first frame",
        [put("ok/anim.webp", two_frames("WEBP"))], "ingested", size=(48, 32), colours=[((0.5, 0.5), RED)])
    add("progressive_jpeg", "a progressive JPEG",
        [put("ok/progressive.jpg", encode(photo, "JPEG", quality=92, progressive=True))], "ingested", size=(96, 64),
        colours=QUAD_CHECK)
    add("greyscale_jpeg", "a greyscale JPEG (L)",
        [put("ok/grey.jpg", encode(Image.new("L", (40, 30), 200), "JPEG"))], "ingested", size=(40, 30),
        colours=[((0.5, 0.5), (200, 200, 200))])
    add("one_bit_png", "a 1-bit black and white PNG",
        [put("ok/bits.png", encode(Image.new("1", (40, 30), 1), "PNG"))], "ingested", size=(40, 30),
        colours=[((0.5, 0.5), WHITE)])
    add("bmp_and_tiff", "BMP and TIFF files", [put("ok/photo.bmp", encode(photo, "BMP")),
                                                put("ok/photo.tif", encode(photo, "TIFF"))],
        "ingested", size=(96, 64), colours=QUAD_CHECK)

    # --- orientation -----------------------------------------------------------------------------------------------
    shown = quadrants()
    files = []
    for o in range(1, 9):
        stored = Image.fromarray(stored_for_orientation(shown, o))
        files.append(put(f"exif/orientation_{o}.jpg", encode(stored, "JPEG", quality=95, exif=exif_orientation(o))))
    add("exif_orientation", "photos saved with EXIF orientation 1 to 8 (raw EXIF bytes): shown upright", files,
        "ingested", size=(96, 64), colours=QUAD_CHECK)
    stored6 = Image.fromarray(stored_for_orientation(shown, 6))
    add("exif_orientation_png_webp", "EXIF orientation 6 in a PNG (eXIf chunk) and in a WebP",
        [put("exif/rotated.png", encode(stored6, "PNG", exif=exif_orientation(6))),
         put("exif/rotated.webp", encode(stored6, "WEBP", lossless=True, exif=exif_orientation(6)))],
        "ingested", size=(96, 64), colours=QUAD_CHECK)
    broken = [
        b"Exif\x00\x00" + b"\x13\x37" * 20,  # no TIFF header
        b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0",  # IFD offset far past the end
        b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 30,  # 65535 entries announced, 2 present
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x63\x00\x00\x00\x00\x00",  # 99
    ]
    add("broken_exif", "JPEGs with broken EXIF (no header, bad offset, 65535 entries, orientation 99): read as stored",
        [put(f"exif/broken_{i}.jpg", with_app1(jpeg, p)) for i, p in enumerate(broken)], "ingested", size=(96, 64),
        colours=QUAD_CHECK)

    # --- names ---------------------------------------------------------------------------------------------------
    add("wrong_extension", "a JPEG named .png", [put("names/really_a_jpeg.png", jpeg)], "ingested", size=(96, 64),
        colours=QUAD_CHECK, expect_format="JPEG")
    add("uppercase_extensions", "extensions .JPG, .PNG, .JpEg",
        [put("names/UPPER.JPG", jpeg), put("names/UPPER.PNG", png), put("names/Mixed.JpEg", jpeg)], "ingested",
        size=(96, 64), colours=QUAD_CHECK)
    add("unicode_name", "unicode in names: été, 照片, emoji, combining accents",
        [put("names/été 照片 🌅.jpg", jpeg), put("names/cafe\u0301.png", png)], "ingested", size=(96, 64),
        colours=QUAD_CHECK)
    add("spaces_and_newlines", "spaces, a newline, a tab, quotes and a leading dash in names",
        [put("names/  two  spaces .jpg", jpeg), put("names/line\nbreak.jpg", jpeg), put("names/tab\there.png", png),
         put("names/-dash 'quote\" ;.webp", webp)], "ingested", size=(96, 64), colours=QUAD_CHECK)
    add("folder_named_like_an_image", "a folder named album.jpg (walked, its photo ingested)",
        [put("names/album.jpg/inside.jpg", jpeg)], "ingested", size=(96, 64), colours=QUAD_CHECK)
    bad_name = os.fsdecode(b"bad-\xff\xfe-name.jpg")
    (folder / "names" / bad_name).write_bytes(jpeg)
    add("invalid_utf8_name", "a name with bytes that are not UTF-8", [f"names/{bad_name}"], "skipped",
        reason="not valid UTF-8", upload=False)  # its bytes are a fine JPEG; a browser sends names as UTF-8
    put("names/notes.txt", b"not an image")
    put("names/clip.mp4", b"\x00\x00\x00\x18ftypmp42")
    add("other_extensions", "a .txt and a .mp4 (not images by their names)", ["names/notes.txt", "names/clip.mp4"],
        "ignored", upload=False)

    # --- links, special files, permissions --------------------------------------------------------------------
    links = folder / "links"
    links.mkdir()
    os.symlink(".", links / "loop")  # a folder that contains itself
    os.symlink("b.jpg", links / "a.jpg")
    os.symlink("a.jpg", links / "b.jpg")
    add("symlink_loop", "a folder link to itself, and two file links to each other", ["links/a.jpg", "links/b.jpg"],
        "skipped", reason="symbolic link loop", upload=False)
    os.symlink("nowhere.jpg", links / "dangling.jpg")
    add("dangling_symlink", "a link to a file that does not exist", ["links/dangling.jpg"], "skipped",
        reason="broken symbolic link", upload=False)
    os.symlink("../ok/one.png", links / "inside.png")
    add("symlink_inside", "a link to an image inside the collection (followed)", ["links/inside.png"], "ingested",
        size=(1, 1), colours=[((0.5, 0.5), GREEN)], upload=False)
    if outside is not None:
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "secret.jpg").write_bytes(jpeg)
        os.symlink(outside / "secret.jpg", links / "out.jpg")
        os.symlink(outside, links / "outdir")
        add("symlink_outside", "a link to a file and one to a folder outside the collection (not followed)",
            ["links/out.jpg", "links/outdir"], "skipped", reason="outside the collection", upload=False)
    (folder / "special").mkdir()
    os.mkfifo(folder / "special" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "special" / "socket.png"))
    sock.close()  # the socket file stays
    add("fifo_and_socket", "a FIFO named .jpg (reading it would block forever) and a socket named .png",
        ["special/pipe.jpg", "special/socket.png"], "skipped", reason="not a regular file", upload=False)
    locked = put("perm/locked.jpg", jpeg)
    os.chmod(folder / locked, 0)
    (folder / "perm" / "closed").mkdir()
    put("perm/closed/hidden.jpg", jpeg)
    os.chmod(folder / "perm" / "closed", 0)
    if AS_ROOT:
        add("no_permission", "a file and a folder without permissions (as root: readable, so ingested)",
            [locked, "perm/closed/hidden.jpg"], "ingested", size=(96, 64), colours=QUAD_CHECK, upload=False)
    else:
        add("no_permission_file", "a file without read permission", [locked], "skipped",
            reason="Permission denied", upload=False)
        add("no_permission_folder", "a folder without permissions", ["perm/closed"], "skipped",
            reason="cannot list folder: Permission denied", upload=False)
    return kinds


def restore_permissions(folder: Path) -> None:
    """Give back the permissions ``make_corpus`` took away (so that the folder can be deleted)."""
    for p in (folder / "perm" / "closed", folder / "perm" / "locked.jpg"):
        if p.exists():
            os.chmod(p, 0o755)


def uploads(folder: Path, kinds: list[Kind]) -> list[tuple[Kind, str, bytes]]:
    """(kind, file name, bytes) of every file of the corpus that a person could upload."""
    out = []
    for kind in kinds:
        if kind.upload:
            for rel in kind.files:
                out.append((kind, Path(rel).name, (folder / rel).read_bytes()))
    return out
