"""Retrieval quality on a labelled set: every image a query against the rest, multi-image queries, near-duplicates.

A labelled set is a folder with ``labels.csv`` (columns ``path``, ``class_id``; paths relative to the folder) and
the images. It is ingested into a lake (a cached one per set by default, so a rerun reads nothing new), then every
query goes through the real engine (``Engine.search``), ranking the whole set: what a user gets is what is measured.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgrec import metrics
from imgrec.lake import Lake
from imgrec.measures import MEASURES

TRANSFORMS = ("resize", "jpeg", "crop", "brightness", "rotate", "flip", "grayscale")
MULTI_SIZES = (2, 3, 5)


class EvalError(ValueError):
    """A labelled set that cannot be evaluated (no labels.csv, bad columns, no image ingested)."""


@dataclass
class LabelledSet:
    root: Path
    items: list[tuple[str, int]]  # (path relative to root, class id)
    ids: dict[int, int]  # image_id -> class id, for the items found in the lake
    folder: str | None  # the set's folder inside its collection, when the lake holds more than the set


def default_lake(dataset: Path) -> Path:
    """A cache lake per labelled set (``$IMGREC_EVAL_CACHE``, else ``~/.cache/imgrec/eval``)."""
    base = Path(os.environ.get("IMGREC_EVAL_CACHE") or Path.home() / ".cache" / "imgrec" / "eval")
    key = hashlib.blake2b(str(dataset.resolve()).encode(), digest_size=4).hexdigest()
    return base / f"{dataset.resolve().name}-{key}"


LABEL_BY = ("csv", "prefix", "auto")  # auto: labels.csv where there is one, else the prefix


def read_labels(dataset: Path, label_by: str = "csv") -> list[tuple[str, int]]:
    """(path relative to the set, class id): from ``labels.csv``, or (``label_by="prefix"``) from each image file's
    name before its first dot (``cat.12.jpg`` -> class ``cat``; classes numbered in name order)."""
    if label_by == "auto":
        label_by = "csv" if (dataset / "labels.csv").is_file() else "prefix"
    if label_by == "prefix":
        from imgrec.config import IMAGE_EXTENSIONS

        files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        names = [Path(f).name.split(".", 1)[0] for f in files]
        classes = {c: i for i, c in enumerate(sorted(set(names)))}
        if len(classes) < 2:
            raise EvalError(f"{dataset}: the file names give {len(classes)} class(es) by their prefix; need 2 or more")
        return [(f, classes[c]) for f, c in zip(files, names, strict=True)]
    if label_by != "csv":
        raise EvalError(f"unknown --label-by {label_by!r}: use {' or '.join(LABEL_BY)}")
    path = dataset / "labels.csv"
    if not path.is_file():
        raise EvalError(f"{dataset} has no labels.csv (columns path, class_id; paths relative to the folder)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "class_id"} <= set(reader.fieldnames):
            raise EvalError(f"{path}: needs the columns path and class_id (has {reader.fieldnames})")
        items = [(row["path"], int(row["class_id"])) for row in reader]
    if not items:
        raise EvalError(f"{path} lists no image")
    return items


def prepare(dataset: str | os.PathLike[str], lake: str | os.PathLike[str] | None = None,
            log: Callable[[str], None] = lambda s: None, progress: bool = False, label_by: str = "csv"
            ) -> tuple[Any, LabelledSet]:
    """The engine over a lake holding the set (ingested there first if it is missing) and the labelled ids."""
    from imgrec.config import Config
    from imgrec.search import Engine
    from pipelines.ingest import ingest

    root = Path(os.path.abspath(Path(dataset).expanduser()))
    items = read_labels(root, label_by)
    lake_path = Path(lake) if lake else default_lake(root)
    engine = Engine(Config.load(lake_path)) if Lake(lake_path).exists else None
    found = _match(engine, root, items) if engine else {}
    if len(found) < len(items) and lake is None:  # the cache lake: ingest (incremental: only what is missing)
        log(f"imgrec: ingesting {root} into {lake_path} ...")
        ingest([root], Config.load(lake_path), progress=progress, log=log)
        engine = Engine(Config.load(lake_path))
        found = _match(engine, root, items)
    if engine is None or not found:
        raise EvalError(f"no image of {root} is in the lake {lake_path}: ingest the folder first "
                        f"(imgrec ingest {root} --lake {lake_path}) or leave out --lake")
    if len(found) < len(items):
        log(f"imgrec: {len(items) - len(found)} labelled images are not in the lake (unreadable?); evaluating "
            f"{len(found)}")
    classes = dict(items)
    ids = {image_id: classes[rel] for rel, image_id in found.items()}
    return engine, LabelledSet(root, items, ids, _set_folder(engine, root, ids))


def _match(engine: Any, root: Path, items: Sequence[tuple[str, int]]) -> dict[str, int]:
    """relpath (as in labels.csv) -> image_id, matching the files by their real path."""
    wanted = {os.path.realpath(root / rel): rel for rel, _ in items}
    out = {}
    for image_id, path in engine.cursor().execute("SELECT image_id, path FROM images").fetchall():
        rel = wanted.get(os.path.realpath(path))
        if rel is not None:
            out[rel] = int(image_id)
    return out


def _set_folder(engine: Any, root: Path, ids: dict[int, int]) -> str | None:
    """The set's folder inside its collection when the lake holds other images too (a filter for the search)."""
    if len(ids) == engine.size:
        return None
    (collection_root,) = engine.cursor().execute(
        "SELECT any_value(c.root) FROM images i JOIN collections c USING (collection) WHERE image_id = ?",
        [next(iter(ids))]).fetchone()
    rel = os.path.relpath(os.path.realpath(root), os.path.realpath(collection_root))
    if rel.startswith(".."):
        raise EvalError(f"{root} is not inside the collection {collection_root} of the lake")
    return "" if rel == "." else rel


def _ranking(engine: Any, ls: LabelledSet, queries: Sequence[Any], measure: str, exclude: Sequence[int],
             **options: Any) -> tuple[list[int], float]:
    """The whole set ranked for ``queries`` (image ids or bytes) with the real engine; (ids, search ms)."""
    folders = [ls.folder] if ls.folder else None
    resp = engine.search(list(queries), measure, k=max(1, len(ls.ids) - len(exclude)), exclude_ids=exclude,
                         folders=folders, with_metadata=False, details=False, **options)
    return [r.image_id for r in resp.results], resp.timings_ms["total"]


def single_image(engine: Any, ls: LabelledSet, measure: str, limit: int | None = None, **options: Any
                 ) -> dict[str, Any]:
    """Every image (or the first ``limit``) a query against the rest: mAP, P@5/10/20, R@100, PR curve, ms."""
    per_class: dict[int, int] = defaultdict(int)
    for c in ls.ids.values():
        per_class[c] += 1
    aps, p5, p10, p20, r100, ms = [], [], [], [], [], []
    curve = np.zeros(21)
    queries = sorted(ls.ids)[:limit] if limit else sorted(ls.ids)
    for q in queries:
        ranked, t = _ranking(engine, ls, [q], measure, [q], **options)
        flags = np.array([ls.ids.get(i) == ls.ids[q] for i in ranked])
        n_rel = per_class[ls.ids[q]] - 1
        aps.append(metrics.average_precision(flags, n_rel))
        p5.append(metrics.precision_at(flags, 5))
        p10.append(metrics.precision_at(flags, 10))
        p20.append(metrics.precision_at(flags, 20))
        r100.append(metrics.recall_at(flags, 100, n_rel))
        curve += np.array([p for _, p in metrics.precision_recall_curve(flags, n_rel)])
        ms.append(t)
    n = len(queries)
    return {"map": _r(np.mean(aps)), "p@5": _r(np.mean(p5)), "p@10": _r(np.mean(p10)), "p@20": _r(np.mean(p20)),
            "r@100": _r(np.mean(r100)), "queries": n, "query_ms": round(statistics.median(ms), 2),
            "pr_curve": [[round(x, 2), _r(y / n)] for x, y in zip(np.linspace(0, 1, 21), curve, strict=True)]}


def multi_image(engine: Any, ls: LabelledSet, measure: str, sets_per_class: int = 5, seed: int = 0,
                **options: Any) -> dict[str, Any]:
    """Sets of 2, 3 and 5 images of one class as one query (relevant: that class), and mixed sets of two classes
    (one image of each; relevant: either class). mAP and P@5 per set size."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for image_id, c in sorted(ls.ids.items()):
        by_class[c].append(image_id)
    per_class = {c: len(v) for c, v in by_class.items()}
    out: dict[str, Any] = {}
    for size in MULTI_SIZES:
        aps, p5 = [], []
        for c, members in sorted(by_class.items()):
            if len(members) <= size:
                continue
            for _ in range(sets_per_class):
                qs = rng.sample(members, size)
                ranked, _ = _ranking(engine, ls, qs, measure, qs, **options)
                flags = [ls.ids.get(i) == c for i in ranked]
                aps.append(metrics.average_precision(flags, per_class[c] - size))
                p5.append(metrics.precision_at(flags, 5))
        out[str(size)] = {"map": _r(np.mean(aps)) if aps else None, "p@5": _r(np.mean(p5)) if p5 else None,
                          "sets": len(aps)}
    classes = sorted(by_class)
    aps, p5 = [], []
    for _ in range(sets_per_class * max(1, len(classes) // 2)):
        a, b = rng.sample(classes, 2)
        qs = [rng.choice(by_class[a]), rng.choice(by_class[b])]
        ranked, _ = _ranking(engine, ls, qs, measure, qs, **options)
        flags = [ls.ids.get(i) in (a, b) for i in ranked]
        aps.append(metrics.average_precision(flags, per_class[a] + per_class[b] - 2))
        p5.append(metrics.precision_at(flags, 5))
    out["mixed"] = {"map": _r(np.mean(aps)), "p@5": _r(np.mean(p5)), "sets": len(aps)}
    return out


def transform(img: Any, name: str) -> bytes:
    """A transformed copy of a PIL image as encoded bytes (what a re-saved or edited copy of a photo looks like)."""
    from PIL import Image, ImageEnhance, ImageOps

    fmt, quality = "JPEG", 90
    w, h = img.size
    if name == "resize":
        img = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)
    elif name == "jpeg":
        quality = 30
    elif name == "crop":
        dx, dy = w // 20, h // 20  # 10% off in each dimension, centred
        img = img.crop((dx, dy, w - dx, h - dy))
    elif name == "brightness":
        img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.25)).enhance(1.2)
    elif name == "rotate":
        img = img.rotate(5, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    elif name == "flip":
        img = ImageOps.mirror(img)
    elif name == "grayscale":
        img = ImageOps.grayscale(img).convert("RGB")
    else:
        raise ValueError(f"unknown transform {name!r}: {', '.join(TRANSFORMS)}")
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def near_duplicates(engine: Any, ls: LabelledSet, measures: Sequence[str], sample: int = 50, seed: int = 0,
                    transforms: Sequence[str] = TRANSFORMS) -> dict[str, dict[str, float]]:
    """For a sample of images, each transformed copy (not in the lake) is a query: how often is the original first
    (recall@1), per measure and transform."""
    from imgrec.imaging import decode

    rng = random.Random(seed)
    originals = rng.sample(sorted(ls.ids), min(sample, len(ls.ids)))
    paths = engine.lookup_ids(originals)
    twins = _twins(engine, ls, originals)
    hits = {m: dict.fromkeys(transforms, 0) for m in measures}
    for image_id in originals:
        img = decode(Path(paths[image_id]["path"]).read_bytes(), min_side=None).image
        for t in transforms:
            data = transform(img, t)
            for m in measures:
                top, _ = _top(engine, ls, data, m)
                hits[m][t] += int(top in twins[image_id])
    return {m: {t: _r(v / len(originals)) for t, v in per.items()} for m, per in hits.items()}


def _twins(engine: Any, ls: LabelledSet, originals: Sequence[int]) -> dict[int, set[int]]:
    """Each original with the images of the set that are the same picture (identical pHash and dHash): a copy whose
    twin comes first has found its picture."""
    idx = engine.index
    ids = np.array(sorted(ls.ids), dtype=np.int64)
    H = np.asarray(idx.hashes[idx.rows(ids)])
    out = {}
    for image_id in originals:
        h = np.asarray(idx.hashes[int(idx.rows([image_id])[0])])
        out[image_id] = {image_id} | {int(i) for i in ids[(H == h).all(axis=1)]}
    return out


def _top(engine: Any, ls: LabelledSet, data: bytes, measure: str) -> tuple[int | None, float]:
    resp = engine.search([data], measure, k=1, folders=[ls.folder] if ls.folder else None, with_metadata=False,
                         details=False)
    return (resp.results[0].image_id if resp.results else None), resp.timings_ms["total"]


def evaluate(dataset: str | os.PathLike[str], measures: Sequence[str] = MEASURES, *,
             lake: str | os.PathLike[str] | None = None, multi: bool = True, near: bool = True,
             limit: int | None = None, near_sample: int = 50, sets_per_class: int = 5, seed: int = 0,
             log: Callable[[str], None] = lambda s: None, progress: bool = False, label_by: str = "csv"
             ) -> dict[str, Any]:
    """The full report for one labelled set (see the module docstring); saved in the lake's ``reports/``."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise EvalError(f"unknown measure(s) {', '.join(unknown)}: choose from {', '.join(MEASURES)}")
    t0 = time.perf_counter()
    engine, ls = prepare(dataset, lake, log=log, progress=progress, label_by=label_by)
    report: dict[str, Any] = {
        "dataset": str(ls.root), "name": ls.root.name, "images": len(ls.ids),
        "classes": len(set(ls.ids.values())), "lake": str(engine.lake.root), "snapshot": engine.snapshot,
        "model": engine.index.meta["model"]["name"], "color_bins": list(engine.index.meta["color_bins"]),
        "weights": dict(engine.config.weights), "aggregate": "softmin", "softmin_tau": engine.config.softmin_tau,
        "measures": {}, "multi": {}, "near_duplicates": {},
    }
    for m in measures:
        log(f"imgrec: {m}: every image a query ...")
        report["measures"][m] = single_image(engine, ls, m, limit=limit)
        if multi:
            report["multi"][m] = multi_image(engine, ls, m, sets_per_class=sets_per_class, seed=seed)
    if near:
        log("imgrec: near-duplicates ...")
        report["near_duplicates"] = near_duplicates(engine, ls, measures, sample=near_sample, seed=seed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    save_report(engine.lake.root, report)
    return report


def save_report(lake: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write the report as ``<lake>/reports/eval-<set>.json`` (atomically; for an S3 lake, also uploaded beside
    it). A partial run (some measures, no multi-image or near-duplicate part) updates the parts it measured of an
    earlier report of the same snapshot and model, and keeps the others."""
    from imgrec.storage import atomic_write_bytes

    where = Lake(lake)
    path = where.local_dir("reports") / f"eval-{report['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = report
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old and all(old.get(k) == report.get(k) for k in ("dataset", "snapshot", "model", "color_bins", "weights")):
        merged = {**report}
        for part in ("measures", "multi", "near_duplicates"):
            merged[part] = {**old.get(part, {}), **report.get(part, {})}
    atomic_write_bytes(path, json.dumps(merged, indent=1).encode())
    where.push(path)
    return path


def load_reports(lake: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every evaluation report saved in a lake (for the Quality page)."""
    where = Lake(lake)
    if where.remote:
        for e in where.store.list("reports"):
            where.pull(e.path)
    out = []
    for path in sorted(where.local_dir("reports").glob("eval-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def format_table(report: dict[str, Any]) -> str:
    """The per-measure table as Markdown."""
    lines = [f"{report['name']}: {report['images']} images, {report['classes']} classes",
             "| measure | mAP | P@5 | P@10 | P@20 | R@100 | query ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in report["measures"].items():
        lines.append(f"| {m} | {r['map']:.3f} | {r['p@5']:.3f} | {r['p@10']:.3f} | {r['p@20']:.3f} | "
                     f"{r['r@100']:.3f} | {r['query_ms']:.1f} |")
    if report.get("multi"):
        lines += ["", "| measure | " + " | ".join(f"{s} images P@5 (mAP)" for s in (*map(str, MULTI_SIZES), "mixed"))
                  + " |", "| --- |" + " --- |" * (len(MULTI_SIZES) + 1)]
        for m, per in report["multi"].items():
            cells = [f"{per[s]['p@5']:.3f} ({per[s]['map']:.3f})" if per[s]["p@5"] is not None else "-"
                     for s in (*map(str, MULTI_SIZES), "mixed")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if report.get("near_duplicates"):
        ts = list(next(iter(report["near_duplicates"].values())))
        lines += ["", "| recall@1 of the original | " + " | ".join(ts) + " |", "| --- |" + " --- |" * len(ts)]
        for m, per in report["near_duplicates"].items():
            lines.append(f"| {m} | " + " | ".join(f"{per[t]:.2f}" for t in ts) + " |")
    return "\n".join(lines)


def _r(x: float) -> float:
    return round(float(x), 4)
