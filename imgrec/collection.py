"""What is in a lake: counts, formats, sizes, dimensions, labels, skipped files, and duplicate groups.

Pure functions over an :class:`imgrec.search.Engine` (its DuckDB cursor over the pinned snapshot and its
memory-mapped index); no Streamlit here, the Collection page caches and draws what they return.

**Duplicates, not similar pictures.** An *exact* duplicate group is a set of images whose files have the same bytes
(``content_hash``, a DuckDB ``GROUP BY``). A *near*-duplicate group is a set of images linked by perceptual-hash
distances of at most a few bits (the same picture resized, re-encoded, recompressed): the connected components of
the graph "Hamming distance <= ``max_distance``", found without looking at all N^2 pairs by multi-index hashing
(:func:`near_pairs`). Pictures that are merely alike (same subject, another shot) are what the Search page finds.

Time of pairs + components (2 shared cores, numpy only; up to twice as long when they are busy), synthetic
hashes of which 10 % are perturbed copies (0-6 bits flipped) of others: phash+dhash (128 bits), max distance 10:
10,000 hashes 0.04 s, 400,000 1.3 s, 1,000,000 7 s; phash (64 bits), max distance 6: 10,000 0.02 s, 400,000 3 s,
1,000,000 19 s. Real hashes have biased bits and cost more candidates (bits with means 0.2-0.5: 400,000 in 2 s and
6 s). Exact: the same pairs as a brute-force scan (tested). ``python -m imgrec.collection`` measures again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec.mih import hamming, near_pairs, synthetic_hashes

if TYPE_CHECKING:
    from imgrec.search import Engine

HASH_MEASURES: dict[str, tuple[int, ...]] = {"phash+dhash": (0, 1), "phash": (0,), "dhash": (1,)}
DEFAULT_MEASURE = "phash+dhash"
DEFAULT_MAX_DISTANCE = {"phash+dhash": 10, "phash": 6, "dhash": 6}  # resized / q=60 copies: <= 9 of 128, <= 4 of 64
PAIRWISE_MAX = 64  # groups up to this size carry their full distance matrix


# --- overview ------------------------------------------------------------------------------------------------------


def _rows(cur: Any, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = cur.execute(query, list(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


@dataclass(frozen=True)
class Overview:
    """Totals of the lake's current snapshot."""

    snapshot: int
    images: int
    bytes: int
    skipped: int
    labelled: int
    collections: list[dict[str, Any]]  # collection, root, images, bytes
    formats: list[dict[str, Any]]  # format, images, bytes


def overview(engine: Engine) -> Overview:
    """Images and bytes in total, per collection and per format; unreadable files; images with labels."""
    if engine.conn is None:
        return Overview(engine.snapshot, 0, 0, 0, 0, [], [])
    cur = engine.cursor()
    collections = _rows(cur, """
        SELECT c.collection, c.root, count(i.image_id) AS images, coalesce(sum(i.size_bytes), 0)::BIGINT AS bytes
        FROM collections c LEFT JOIN images i USING (collection)
        GROUP BY c.collection, c.root ORDER BY images DESC, c.collection""")
    formats = _rows(cur, """
        SELECT coalesce(format, '?') AS format, count(*) AS images, sum(size_bytes)::BIGINT AS bytes
        FROM images GROUP BY ALL ORDER BY images DESC, format""")
    skipped = int(cur.execute("SELECT count(*) FROM skipped").fetchone()[0])
    labelled = int(cur.execute(
        "SELECT count(DISTINCT image_id) FROM labels WHERE image_id IN (SELECT image_id FROM images)").fetchone()[0])
    return Overview(engine.snapshot, sum(c["images"] for c in collections), sum(c["bytes"] for c in collections),
                    skipped, labelled, collections, formats)


def _size_label(lo: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if lo >= scale:
            return f"{lo / scale:g} {unit}"
    return f"{lo:g} B"


def size_histogram(engine: Engine) -> list[dict[str, Any]]:
    """Images per file-size bin (powers of two: [lo, 2 lo)), with a readable label, smallest first."""
    rows = _rows(engine.cursor(), """
        SELECT floor(log2(greatest(size_bytes, 1)))::INT AS b, count(*) AS images
        FROM images GROUP BY b ORDER BY b""")
    return [{"bin": f"{_size_label(2 ** r['b'])}–{_size_label(2 ** (r['b'] + 1))}", "order": r["b"],
             "lo_bytes": 2 ** r["b"], "images": r["images"]} for r in rows]


def dimension_histogram(engine: Engine) -> list[dict[str, Any]]:
    """Images per bin of the longer side in pixels (powers of two), and per orientation."""
    rows = _rows(engine.cursor(), """
        SELECT floor(log2(greatest(width, height, 1)))::INT AS b,
               CASE WHEN width > height THEN 'landscape' WHEN width < height THEN 'portrait' ELSE 'square' END
                   AS orientation,
               count(*) AS images
        FROM images WHERE width IS NOT NULL GROUP BY ALL ORDER BY b, orientation""")
    return [{"bin": f"{2 ** r['b']}–{2 ** (r['b'] + 1) - 1} px", "order": r["b"], "orientation": r["orientation"],
             "images": r["images"]} for r in rows]


def quantiles(engine: Engine, qs: Sequence[float] = (0.0, 0.05, 0.5, 0.95, 1.0)) -> list[dict[str, Any]]:
    """Quantiles of width, height, megapixels and file size (KB), one row per quantity."""
    cols = {"width (px)": "width", "height (px)": "height", "megapixels": "width * height / 1e6",
            "file size (KB)": "size_bytes / 1024"}
    qlist = ", ".join(f"{q:g}" for q in qs)
    select = ", ".join(f"quantile_cont({expr}, [{qlist}])" for expr in cols.values())
    row = engine.cursor().execute(f"SELECT {select} FROM images").fetchone()
    out = []
    for name, values in zip(cols, row or [None] * len(cols), strict=True):
        entry: dict[str, Any] = {"quantity": name}
        for q, v in zip(qs, values or [None] * len(qs), strict=True):
            label = {0.0: "min", 1.0: "max", 0.5: "median"}.get(q, f"p{round(q * 100)}")
            entry[label] = None if v is None else round(float(v), 2)
        out.append(entry)
    return out


def common_dimensions(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent width x height."""
    return _rows(engine.cursor(), """
        SELECT width || ' x ' || height AS dimensions, count(*) AS images FROM images
        WHERE width IS NOT NULL GROUP BY ALL ORDER BY images DESC, dimensions LIMIT ?""", [int(limit)])


def top_labels(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The model's most frequent top-1 labels: label, images, mean probability of that label."""
    return _rows(engine.cursor(), """
        SELECT l.label, count(*) AS images, round(avg(l.probs[1]), 3) AS mean_prob
        FROM labels l JOIN images i USING (image_id) WHERE l.label IS NOT NULL
        GROUP BY l.label ORDER BY images DESC, l.label LIMIT ?""", [int(limit)])


def skipped_reasons(engine: Engine) -> list[dict[str, Any]]:
    """Unreadable files per reason, most frequent first."""
    return _rows(engine.cursor(), "SELECT reason, count(*) AS files FROM skipped GROUP BY reason "
                                  "ORDER BY files DESC, reason")


def skipped_files(engine: Engine, limit: int | None = 1000) -> list[dict[str, Any]]:
    """The files found but not ingested, with the reason (path order)."""
    lim = "" if limit is None else f" LIMIT {int(limit)}"
    return _rows(engine.cursor(), 'SELECT collection, relpath, path, size_bytes, reason, "at" FROM skipped '
                                  f"ORDER BY path{lim}")


def recent_runs(engine: Engine, limit: int = 5) -> list[dict[str, Any]]:
    """The last ingestion runs: when, how many images, images/s, interrupted or not."""
    import json

    out = []
    for r in _rows(engine.cursor(), "SELECT run_id, started_at, finished_at, stats FROM runs "
                                    "ORDER BY finished_at DESC LIMIT ?", [int(limit)]):
        try:
            stats = json.loads(r["stats"] or "{}")
        except ValueError:
            stats = {}
        out.append({"finished": r["finished_at"], "seen": stats.get("scanned"), "ingested": stats.get("processed"),
                    "unchanged": stats.get("unchanged"), "skipped": stats.get("skipped"),
                    "images/s": stats.get("images_per_s"), "seconds": round(float(stats.get("seconds") or 0), 1),
                    "interrupted": bool(stats.get("interrupted"))})
    return out


# --- duplicate groups ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One image of a duplicate group."""

    image_id: int
    path: str
    relpath: str
    collection: str
    size_bytes: int
    width: int | None
    height: int | None
    format: str | None
    content_hash: str
    distance: int = 0  # Hamming distance to the group's first member (0 for an exact copy)


@dataclass
class DuplicateGroup:
    """Images that are the same picture: ``kind`` "exact" (same bytes) or "near" (hash distance)."""

    kind: str
    members: list[Member]
    max_distance: int = 0  # the largest pairwise Hamming distance within the group
    distances: list[list[int]] | None = None  # pairwise distances (member order), groups of <= PAIRWISE_MAX

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def ids(self) -> list[int]:
        return [m.image_id for m in self.members]

    @property
    def redundant_bytes(self) -> int:
        """Bytes that keeping only the first member would free."""
        return sum(m.size_bytes for m in self.members[1:])


@dataclass
class Duplicates:
    """Duplicate groups, largest first (``groups`` holds at most ``limit`` of ``total_groups``)."""

    kind: str
    groups: list[DuplicateGroup]
    total_groups: int
    images: int  # images in all groups
    redundant_bytes: int  # over all groups
    measure: str | None = None
    max_distance: int | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


_MEMBER_COLS = "image_id, path, relpath, collection, size_bytes, width, height, format, content_hash"


def _members(cur: Any, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    rows = _rows(cur, f"SELECT {_MEMBER_COLS} FROM images WHERE image_id IN (SELECT unnest(?))",
                 [[int(i) for i in ids]])
    return {int(r["image_id"]): r for r in rows}


def _member(row: dict[str, Any], distance: int = 0) -> Member:
    return Member(int(row["image_id"]), row["path"], row["relpath"], row["collection"], int(row["size_bytes"] or 0),
                  row["width"], row["height"], row["format"], row["content_hash"], int(distance))


def exact_duplicates(engine: Engine, limit: int | None = 100) -> Duplicates:
    """Groups of images whose files have the same bytes (same ``content_hash``), largest groups first.

    One DuckDB ``GROUP BY`` over the lake; members in ingestion order (image id). ``limit`` bounds the groups
    returned with their members (the totals count them all).
    """
    t0 = time.perf_counter()
    if engine.conn is None:
        return Duplicates("exact", [], 0, 0, 0)
    cur = engine.cursor()
    exact = """WITH exact AS (
        SELECT content_hash, count(*) AS n, min(image_id) AS first_id, any_value(size_bytes) AS size_bytes
        FROM images WHERE content_hash IS NOT NULL AND content_hash <> ''
        GROUP BY content_hash HAVING count(*) > 1)"""
    total, images, redundant = cur.execute(
        f"{exact} SELECT count(*), coalesce(sum(n), 0), coalesce(sum((n - 1) * size_bytes), 0) FROM exact"
    ).fetchone()
    lim = "" if limit is None else f" LIMIT {int(limit)}"
    rows = _rows(cur, f"""{exact}
        SELECT {', '.join('i.' + c for c in _MEMBER_COLS.split(', '))}, e.n, e.first_id
        FROM (SELECT * FROM exact ORDER BY n DESC, first_id{lim}) e JOIN images i USING (content_hash)
        ORDER BY e.n DESC, e.first_id, i.image_id""")
    groups: dict[str, DuplicateGroup] = {}
    for r in rows:
        g = groups.setdefault(r["content_hash"], DuplicateGroup("exact", []))
        g.members.append(_member(r))
    for g in groups.values():
        if g.size <= PAIRWISE_MAX:
            g.distances = [[0] * g.size for _ in range(g.size)]
    return Duplicates("exact", list(groups.values()), int(total), int(images), int(redundant),
                      seconds=round(time.perf_counter() - t0, 4))


def components(n: int, i: NDArray[np.int64], j: NDArray[np.int64]) -> NDArray[np.int64]:
    """Connected-component label (the smallest member index) of each of ``n`` nodes given edges (i, j)."""
    label = np.arange(n, dtype=np.int64)
    if i.size == 0:
        return label
    while True:  # union-find by min-label propagation with pointer jumping; O(log n) rounds in practice
        li, lj = label[i], label[j]
        low = np.minimum(li, lj)
        before = label.copy()
        np.minimum.at(label, li, low)
        np.minimum.at(label, lj, low)
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        if np.array_equal(label, before):
            return label


def near_duplicates(engine: Engine, max_distance: int | None = None, measure: str = DEFAULT_MEASURE,
                    limit: int | None = 100) -> Duplicates:
    """Groups of images whose perceptual hashes are within ``max_distance`` bits, chained (connected components).

    ``measure``: "phash+dhash" (128 bits, default max distance 10), "phash" or "dhash" (64 bits, default 6).
    Groups made only of exact copies (one ``content_hash``) are left out: :func:`exact_duplicates` lists them. A
    group's first member is its largest image (most pixels, then bytes, then lowest id); every member carries its
    distance to it; ``max_distance`` of a group is its largest pairwise distance (chaining can make it exceed the
    threshold). Work grows with n and the number of near pairs, never with n^2 (see :func:`near_pairs`).
    """
    if measure not in HASH_MEASURES:
        raise ValueError(f"unknown measure {measure!r}: choose one of {', '.join(HASH_MEASURES)}")
    t = DEFAULT_MAX_DISTANCE[measure] if max_distance is None else int(max_distance)
    if t < 0:
        raise ValueError("max_distance must be at least 0")
    t0 = time.perf_counter()
    idx = engine.index
    result = Duplicates("near", [], 0, 0, 0, measure=measure, max_distance=t)
    if idx is None or idx.size < 2 or engine.conn is None:
        return result
    cols = list(HASH_MEASURES[measure])
    ids = np.asarray(idx.ids, dtype=np.int64)
    H = np.ascontiguousarray(np.asarray(idx.hashes)[:, cols], dtype=np.uint64)
    timings: dict[str, float] = {}
    lap = time.perf_counter()
    # distinct hash values only: identical hashes are at distance 0 anyway, and exact copies collapse
    uniq, inverse = np.unique(H, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    timings["unique"] = time.perf_counter() - lap
    lap = time.perf_counter()
    stats: dict[str, Any] = {}
    pi, pj, _ = near_pairs(uniq, t, stats=stats)
    timings["pairs"] = time.perf_counter() - lap
    lap = time.perf_counter()
    comp = components(uniq.shape[0], pi, pj)[inverse]  # per image
    sizes = np.bincount(comp, minlength=uniq.shape[0])
    grouped = np.flatnonzero(sizes[comp] > 1)  # rows (images) in a component of 2 or more
    timings["components"] = time.perf_counter() - lap
    lap = time.perf_counter()
    result.stats = {"hashes": int(H.shape[0]), "distinct_hashes": int(uniq.shape[0]), "pairs": int(pi.size), **stats}
    if grouped.size == 0:
        result.seconds = round(time.perf_counter() - t0, 4)
        result.stats["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        return result
    # drop components whose members all have the same bytes (DuckDB over the grouped images only)
    import pyarrow as pa

    cur = engine.cursor()
    table = pa.table({"image_id": ids[grouped], "comp": comp[grouped], "row": grouped})  # noqa: F841 (DuckDB)
    cur.register("_near_members", table)
    info = cur.execute("""
        SELECT m.comp, list(m.row ORDER BY m.row) AS rows, count(*) AS n,
               sum(i.size_bytes) - max(i.size_bytes) AS redundant
        FROM _near_members m JOIN images i USING (image_id)
        GROUP BY m.comp HAVING count(DISTINCT i.content_hash) > 1
        ORDER BY n DESC, min(m.image_id)""").fetchall()
    cur.unregister("_near_members")
    timings["filter"] = time.perf_counter() - lap
    lap = time.perf_counter()
    result.total_groups = len(info)
    result.images = int(sum(r[2] for r in info))
    result.redundant_bytes = int(sum(r[3] or 0 for r in info))
    shown = info if limit is None else info[: int(limit)]
    meta = _members(cur, [int(ids[r]) for c in shown for r in c[1]])  # the same cursor: the same snapshot
    for _, rows, _, _ in shown:
        rows = np.asarray([r for r in rows if int(ids[r]) in meta], dtype=np.int64)
        if rows.size < 2:
            continue
        members = [meta[int(ids[r])] for r in rows]
        first = max(range(len(rows)), key=lambda k: ((members[k]["width"] or 0) * (members[k]["height"] or 0),
                                                     members[k]["size_bytes"] or 0, -members[k]["image_id"]))
        d0 = hamming(H[rows], H[rows[first]][None, :])
        order = sorted(range(len(rows)), key=lambda k: (k != first, int(d0[k]), members[k]["image_id"]))
        rows = rows[order]
        group = DuplicateGroup("near", [_member(members[k], int(d0[k])) for k in order])
        group.max_distance, group.distances = _pairwise(H[rows])
        result.groups.append(group)
    timings["members"] = time.perf_counter() - lap
    result.seconds = round(time.perf_counter() - t0, 4)
    result.stats["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    return result


def _pairwise(H: NDArray[np.uint64], sample: int = 2048) -> tuple[int, list[list[int]] | None]:
    """(largest pairwise distance, the distance matrix if small) of a group's hashes (a sample of big groups)."""
    if H.shape[0] > sample:
        H = H[np.linspace(0, H.shape[0] - 1, sample).astype(int)]
    D = np.bitwise_count(H[:, None, :] ^ H[None, :, :]).sum(axis=2, dtype=np.int64)
    matrix = D.tolist() if H.shape[0] <= PAIRWISE_MAX else None
    return int(D.max()), matrix


# --- measuring -----------------------------------------------------------------------------------------------------


def _benchmark(sizes: Sequence[int] = (10_000, 400_000)) -> None:  # pragma: no cover (a measuring aid)
    for words, t in ((2, DEFAULT_MAX_DISTANCE["phash+dhash"]), (1, DEFAULT_MAX_DISTANCE["phash"])):
        for n in sizes:
            H = synthetic_hashes(n, words)
            t0 = time.perf_counter()
            uniq, inverse = np.unique(H, axis=0, return_inverse=True)
            stats: dict[str, Any] = {}
            i, j, _ = near_pairs(uniq, t, stats=stats)
            comp = components(uniq.shape[0], i, j)[inverse.reshape(-1)]
            groups = int((np.bincount(comp) > 1).sum())
            print(f"{64 * words} bits, t={t}, n={n:,}: {time.perf_counter() - t0:.2f} s, {i.size:,} pairs, "
                  f"{groups:,} groups; {stats}")


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
