"""The source of real features: a lake of real photos (given, or ingested once from ``../shared/data`` and cached),
or, where those photos are absent (CI), a few hundred photo-like images drawn with PIL."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imgrec.bench.common import REPO, Log, digest, publish_dir, tmp_dir_for
from imgrec.config import IMAGE_EXTENSIONS

SHARED = REPO.parent / "shared" / "data"
SOURCE_SETS = ("corel1k_wang", "oxford_flowers17")  # the default source lake: 2,360 labelled real photos
INGEST_SETS = ("oxford_flowers17", "dogs_vs_cats_200px")  # ingestion throughput on real photos
GENERATED = 300  # images drawn when ../shared/data is absent


@dataclass
class Source:
    lake: Path
    kind: str  # "given" (--source-lake), "real" (ingested from ../shared/data) or "generated" (PIL, no real photos)
    description: str
    images: int = 0
    built_s: float | None = None  # seconds spent ingesting it in this run (None: cached or given)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lake": str(self.lake)}


def shared_data() -> Path | None:
    return SHARED if SHARED.is_dir() else None


def image_files(root: Path) -> list[Path]:
    """Image files below ``root`` in sorted order (what ingestion would walk)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def count_images(lake: Path) -> int:
    from imgrec.lake import Lake

    conn = Lake(lake).connect()
    try:
        return conn.count()
    finally:
        conn.close()


def source_lake(given: Path | None, work: Path, log: Log) -> Source:
    """The lake whose features seed the synthetic collections (ingested and cached on first use)."""
    if given is not None:
        given = Path(given).expanduser().resolve()
        from imgrec.lake import Lake

        if not Lake(given).exists:
            raise FileNotFoundError(f"there is no lake at {given}")
        n = count_images(given)
        return Source(given, "given", f"the lake {given} ({n:,} images)", n)
    shared = shared_data()
    if shared is not None:
        roots = [shared / s for s in SOURCE_SETS if (shared / s).is_dir()]
    if shared is not None and roots:
        key = digest([r.name for r in roots], [len(image_files(r)) for r in roots], 1)
        lake = work / f"source-real-{key}"
        built = None
        if not lake.is_dir():
            log(f"building the source lake from {', '.join(r.name for r in roots)} (once; cached in {lake})")
            built = _ingest_into(roots, lake, log)
        n = count_images(lake)
        return Source(lake, "real", f"real photos of ../shared/data: {' + '.join(r.name for r in roots)} "
                                    f"({n:,} images)", n, built)
    images = generated_images(work, log)
    lake = work / f"source-generated-{digest(GENERATED, 1)}"
    built = None
    if not lake.is_dir():
        log(f"../shared/data is absent: a source lake of {GENERATED} generated images (cached in {lake})")
        built = _ingest_into([images], lake, log)
    n = count_images(lake)
    return Source(lake, "generated", f"{n} photo-like images drawn with PIL (../shared/data absent: no real "
                                     "photos, so the figures only show the machinery works)", n, built)


def _ingest_into(roots: list[Path], lake: Path, log: Log) -> float:
    """Ingest ``roots`` into a new lake at ``lake`` (made aside, then renamed); the seconds it took."""
    import sys

    from imgrec.config import Config
    from pipelines.ingest import ingest

    tmp = tmp_dir_for(lake)
    step = [0]

    def progress(done: int, total: int) -> None:  # a line per tenth when there is no progress bar
        if done * 10 // max(total, 1) > step[0]:
            step[0] = done * 10 // max(total, 1)
            log(f"  {done:,} / {total:,} images")

    report = ingest(roots, Config.load(tmp), progress=sys.stderr.isatty(),
                    on_progress=None if sys.stderr.isatty() else progress, log=log)
    log(f"source lake: {report.processed} images at {report.images_per_s:.1f} images/s")
    publish_dir(tmp, lake)
    return round(report.seconds, 1)


def generated_images(work: Path, log: Log, n: int = GENERATED) -> Path:
    """A folder of ``n`` photo-like JPEGs in 10 classes (cached)."""
    final = work / f"generated-images-{n}"
    if final.is_dir():
        return final
    tmp = tmp_dir_for(final)
    for i in range(n):
        cls = i % 10
        path = tmp / f"class_{cls:02d}" / f"img_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_photo(i, cls).save(path, quality=90)
    publish_dir(tmp, final)
    log(f"drew {n} images in {final}")
    return final


def draw_photo(seed: int, cls: int, size: tuple[int, int] = (256, 192)) -> Any:
    """A photo-like picture: a class-coloured gradient with random shapes, blur and sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    crng, rng = np.random.default_rng(1000 + cls), np.random.default_rng(seed)
    w, h = size
    c0, c1 = crng.integers(0, 256, 3), crng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if cls % 2 else np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(((c0 * (1 - t) + c1 * t) * np.ones((h, w, 1))).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    palette = crng.integers(0, 256, (3, 3))
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
        fill = tuple(int(v) for v in np.clip(palette[rng.integers(0, 3)] + rng.normal(0, 20, 3), 0, 255))
        (draw.ellipse if (cls + int(rng.integers(0, 3))) % 2 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "RGB")


def photo_files(lake: Path, n: int, seed: int = 0) -> list[Path]:
    """Up to ``n`` distinct image files of the lake that still exist, spread over the lake (real photos to upload)."""
    import random

    from imgrec.lake import Lake

    conn = Lake(lake).connect()
    try:
        paths = [Path(p) for (p,) in conn.sql("SELECT path FROM images ORDER BY image_id")]
    finally:
        conn.close()
    random.Random(seed).shuffle(paths)
    out = []
    for p in paths:
        if len(out) >= n:
            break
        if p.is_file():
            out.append(p)
    return out


def ingest_sets(work: Path, log: Log) -> list[tuple[str, Path, str]]:
    """The folders whose ingestion is timed: (name, folder, kind), real photos where ``../shared/data`` exists."""
    shared = shared_data()
    if shared is not None:
        found = [(s, shared / s, "real") for s in INGEST_SETS if (shared / s).is_dir()]
        if found:
            return found
    return [("generated", generated_images(work, log), "generated")]


def subset(root: Path, n: int, dst: Path) -> Path:
    """``root`` itself when ``n`` covers it, else a folder of ``n`` of its images spread over the sorted walk
    (copies, keeping the sub-folders: the walk does not follow links out of its root)."""
    files = image_files(root)
    if n <= 0 or n >= len(files):
        return root
    step = len(files) / n
    picks = [files[int(i * step)] for i in range(n)]
    shutil.rmtree(dst, ignore_errors=True)
    for f in picks:
        target = dst / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return dst


def unique_upload(data: bytes, n: int) -> bytes:
    """The photo's bytes made distinct (a few bytes after the image's end, which decoders ignore), so that the
    engine's upload cache (by content hash) never answers and every upload is decoded and embedded."""
    return data + b"\x00imgrec-bench-" + str(n).encode()
