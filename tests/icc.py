"""A minimal ICC v2 display profile (matrix/TRC) built from primaries and a gamma, for the colour-profile tests:
no profile file ships with the tests or the system, so the wide-gamut one is generated here."""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
# Adobe RGB (1998), primaries adapted to D50 as in Adobe's own profile; gamma 563/256
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
ADOBE_GAMMA = 563 / 256


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(v: tuple[float, float, float]) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(c) for c in v)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + struct.pack(">II", 0, 0) + b"\0" * 3 \
        + b"\0" * 67


def matrix_profile(name: str = "Adobe RGB (1998) compatible", primaries=ADOBE_RGB, gamma: float = ADOBE_GAMMA
                   ) -> bytes:
    """The bytes of an RGB display profile with these D50 primaries (red, green, blue XYZ) and one gamma."""
    tags = [(b"desc", _desc(name)), (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(primaries[0])),
            (b"gXYZ", _xyz(primaries[1])), (b"bXYZ", _xyz(primaries[2])), (b"rTRC", _curve(gamma)),
            (b"gTRC", _curve(gamma)), (b"bTRC", _curve(gamma)), (b"cprt", b"text" + b"\0" * 4 + b"none\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = [], b""
    for sig, data in tags:
        pad = data + b"\0" * (-len(data) % 4)
        table.append(struct.pack(">4sII", sig, offset + len(body), len(data)))
        body += pad
    size = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", size, b"\0" * 4, 0x02100000, b"mntr", b"RGB ", b"XYZ ") + b"\0" * 12 \
        + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(_s15(c) for c in D50) + b"\0" * 48
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(table) + body
