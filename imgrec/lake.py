"""The Parquet lake: append-only part files per table, made visible by an atomic manifest, read through DuckDB.

Layout of a lake directory::

    manifest.json            the committed state: snapshot number, the part files of every table, the model
    tables/<table>/part-*.parquet
    indexes/<snapshot>/      search structures built for one snapshot (see imgrec.index)

A part file is written under a temporary name, fsynced and renamed; it becomes visible only when a new manifest that
lists it replaces the old one (write, fsync, rename). Readers only ever open the files a manifest lists, so a crash at
any point leaves either the old or the new snapshot, never a half-written part. Files no manifest lists (left by a
crash) are deleted by the next writer, which holds an exclusive lock on the lake.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # polars, DuckDB and pyarrow are imported where used: a search by the index needs none of them
    import duckdb
    import polars as pl
    import pyarrow as pa

FORMAT_VERSION = 1
GARBAGE_GRACE_S = 600.0  # replaced parts stay this long for readers of an older snapshot
COMPACT_BELOW_BYTES = 64 * 1024 * 1024


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def schemas(bins: int = 128, dim: int = 1280) -> dict[str, dict[str, pl.DataType]]:
    """The columns of every table; ``bins`` and ``dim`` are fixed when a lake is created."""
    import polars as pl

    ts = pl.Datetime("us")
    return {
        "collections": {"collection": pl.Utf8, "root": pl.Utf8, "added_at": ts},
        "images": {
            "image_id": pl.Int64, "version": pl.Int64, "collection": pl.Utf8, "relpath": pl.Utf8,
            "file_name": pl.Utf8, "folder": pl.Utf8, "size_bytes": pl.Int64, "mtime_ns": pl.Int64, "mtime": ts,
            "width": pl.Int32, "height": pl.Int32, "format": pl.Utf8, "mode": pl.Utf8, "content_hash": pl.Utf8,
            "ingested_at": ts,
        },
        "removed": {"image_id": pl.Int64, "version": pl.Int64, "reason": pl.Utf8, "removed_at": ts},
        "skipped": {
            "collection": pl.Utf8, "relpath": pl.Utf8, "size_bytes": pl.Int64, "mtime_ns": pl.Int64,
            "reason": pl.Utf8, "version": pl.Int64, "at": ts,
        },
        "color": {"image_id": pl.Int64, "hist": pl.Array(pl.Float32, bins)},
        "hashes": {"image_id": pl.Int64, "phash": pl.UInt64, "dhash": pl.UInt64},
        "embeddings": {"image_id": pl.Int64, "vector": pl.Array(pl.Float32, dim)},
        "labels": {
            "image_id": pl.Int64, "label": pl.Utf8, "labels": pl.List(pl.Utf8), "probs": pl.List(pl.Float32),
        },
        "thumbnails": {"image_id": pl.Int64, "thumb": pl.Binary},
        "runs": {"run_id": pl.Utf8, "started_at": ts, "finished_at": ts, "stats": pl.Utf8},
    }


TABLES = ("collections", "images", "removed", "skipped", "color", "hashes", "embeddings", "labels", "thumbnails",
          "runs")  # the keys of schemas()


class LakeError(RuntimeError):
    """Something about the lake a person must act on (locked, built with another model, ...)."""


@dataclass(frozen=True)
class Manifest:
    snapshot: int
    next_image_id: int
    tables: dict[str, list[str]]
    model: dict[str, Any]
    color_bins: tuple[int, int, int]
    thumb_size: int
    garbage: list[list[Any]]
    created_at: str
    updated_at: str

    @property
    def bins(self) -> int:
        a, b, c = self.color_bins
        return a * b * c

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "snapshot": self.snapshot, "next_image_id": self.next_image_id,
            "model": self.model, "color_bins": list(self.color_bins), "thumb_size": self.thumb_size,
            "tables": self.tables, "garbage": self.garbage,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT_VERSION:
            raise LakeError(f"lake format {d.get('format')} is not supported by this imgrec (format {FORMAT_VERSION})")
        return cls(
            snapshot=int(d["snapshot"]), next_image_id=int(d["next_image_id"]),
            tables={t: list(d["tables"].get(t, [])) for t in TABLES}, model=dict(d["model"]),
            color_bins=tuple(d["color_bins"]), thumb_size=int(d["thumb_size"]), garbage=list(d.get("garbage", [])),
            created_at=d["created_at"], updated_at=d["updated_at"],
        )


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename in the same directory, fsynced: readers see the old file or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Lake:
    """A lake directory. Reading needs no lock; writing goes through ``Lake.writer()``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> Manifest | None:
        try:
            return Manifest.from_json(json.loads(self.manifest_path.read_text()))
        except FileNotFoundError:
            return None

    def snapshot(self) -> int:
        m = self.manifest()
        return m.snapshot if m else -1

    # --- reading -------------------------------------------------------------------------------------------------

    def connect(self, manifest: Manifest | None = None) -> LakeConnection:
        """An in-process DuckDB connection with one view per table, pinned to one snapshot."""
        return LakeConnection(self, manifest or self.manifest())

    # --- writing -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self) -> Iterator[LakeWriter]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise LakeError(f"another process is writing the lake {self.root}; wait for it to finish") from None
        try:
            w = LakeWriter(self)
            w.collect_garbage()
            yield w
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()


class LakeWriter:
    """Commits batches of rows atomically. Only one exists per lake at a time (file lock)."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    @property
    def manifest(self) -> Manifest | None:
        return self.lake.manifest()

    def create(self, model: dict[str, Any], color_bins: tuple[int, int, int], thumb_size: int) -> Manifest:
        """Start an empty lake (snapshot 0) with one empty part per table, so every view has a schema."""
        stamp = now().isoformat()
        import polars as pl

        m = Manifest(0, 0, {t: [] for t in TABLES}, model, tuple(color_bins), thumb_size, [], stamp, stamp)
        sch = schemas(m.bins, int(model["dim"]))
        parts = {t: [self._write_part(t, pl.DataFrame(schema=sch[t]), 0)] for t in TABLES}
        m = Manifest(0, 0, parts, model, tuple(color_bins), thumb_size, [], stamp, stamp)
        self._write_manifest(m)
        return m

    def _write_part(self, table: str, df: pl.DataFrame, snapshot: int) -> str:
        rel = f"tables/{table}/part-{snapshot:08d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.lake.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        df.write_parquet(tmp, compression="zstd", statistics=True, row_group_size=16384)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return rel

    def _write_manifest(self, m: Manifest) -> None:
        atomic_write_bytes(self.lake.manifest_path, json.dumps(m.to_json(), indent=1).encode())

    def commit(self, frames: dict[str, pl.DataFrame], next_image_id: int | None = None) -> Manifest:
        """Write every non-empty frame as a new part and publish them all in one new snapshot."""
        m = self.manifest
        if m is None:
            raise LakeError("the lake has not been created yet")
        snap = m.snapshot + 1
        tables = {t: list(v) for t, v in m.tables.items()}
        sch = schemas(m.bins, int(m.model["dim"]))
        for table, df in frames.items():
            if df.height:
                if "version" in df.columns:
                    import polars as pl

                    df = df.with_columns(pl.lit(snap, dtype=pl.Int64).alias("version"))
                tables[table].append(self._write_part(table, df.select(list(sch[table])).cast(sch[table]), snap))
        new = Manifest(
            snap, m.next_image_id if next_image_id is None else next_image_id, tables, m.model, m.color_bins,
            m.thumb_size, m.garbage, m.created_at, now().isoformat(),
        )
        self._write_manifest(new)
        return new

    def compact(self) -> Manifest:
        """Merge the small parts of each table into one (sorted by image_id where it has one)."""
        m = self.manifest
        if m is None:
            return m  # type: ignore[return-value]
        tables = {t: list(v) for t, v in m.tables.items()}
        garbage = list(m.garbage)
        changed = False
        import duckdb

        con = duckdb.connect()
        for table, parts in m.tables.items():
            small = [p for p in parts if (self.lake.root / p).stat().st_size < COMPACT_BELOW_BYTES]
            if len(small) < 2:
                continue
            rel = f"tables/{table}/part-{m.snapshot + 1:08d}-{uuid.uuid4().hex[:8]}.parquet"
            out = self.lake.root / rel
            tmp = out.with_name(out.name + ".tmp")
            files = [str(self.lake.root / p) for p in small]
            order = " ORDER BY image_id" if "image_id" in schemas()[table] else ""
            con.execute(
                f"COPY (SELECT * FROM read_parquet(?){order}) TO '{tmp}' "
                "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 16384)",
                [files],
            )
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, out)
            tables[table] = [p for p in parts if p not in small] + [rel]
            garbage += [[p, time.time()] for p in small]
            changed = True
        con.close()
        if not changed:
            return m
        new = Manifest(
            m.snapshot + 1, m.next_image_id, tables, m.model, m.color_bins, m.thumb_size, garbage,
            m.created_at, now().isoformat(),
        )
        self._write_manifest(new)
        return new

    def collect_garbage(self) -> None:
        """Delete temp files and parts that no manifest lists (crash leftovers), and replaced parts past the grace."""
        m = self.manifest
        tables_dir = self.lake.root / "tables"
        if m is None or not tables_dir.is_dir():
            return
        live = {p for parts in m.tables.values() for p in parts}
        keep_garbage = [[p, t] for p, t in m.garbage if time.time() - t < GARBAGE_GRACE_S]
        grace = {p for p, _ in keep_garbage}
        for path in tables_dir.glob("*/*"):
            rel = path.relative_to(self.lake.root).as_posix()
            if rel not in live and rel not in grace:
                path.unlink(missing_ok=True)
        if len(keep_garbage) != len(m.garbage):
            self._write_manifest(
                Manifest(m.snapshot, m.next_image_id, m.tables, m.model, m.color_bins, m.thumb_size, keep_garbage,
                         m.created_at, m.updated_at)
            )


class LakeConnection:
    """DuckDB over one snapshot of the lake.

    Views: ``collections``, ``images_all`` (every version), ``images`` (the current images with absolute ``path``,
    a table materialised once per connection), ``removed``, ``skipped`` (the current unreadable files), and one view
    per feature table (``color``, ``hashes``, ``embeddings``, ``labels``, ``thumbnails``, ``runs``).
    """

    def __init__(self, lake: Lake, manifest: Manifest | None) -> None:
        self.lake = lake
        self.manifest = manifest
        self.snapshot = manifest.snapshot if manifest else -1
        import duckdb
        import polars as pl

        self.con = duckdb.connect(config={"threads": max(1, min(4, os.cpu_count() or 1))})
        sch = schemas(manifest.bins, int(manifest.model["dim"])) if manifest else schemas()
        for table in TABLES:
            parts = manifest.tables[table] if manifest else []
            if parts:
                files = [str(lake.root / p) for p in parts]
                self.con.execute(f"CREATE VIEW {_src(table)} AS SELECT * FROM read_parquet({sql_list(files)})")
            else:
                empty = pl.DataFrame(schema=sch[table]).to_arrow()  # noqa: F841 (read by DuckDB below)
                self.con.execute(f"CREATE TABLE {_src(table)} AS SELECT * FROM empty")
        self.con.execute("CREATE VIEW collections AS SELECT * FROM collections_src")
        self.con.execute("CREATE VIEW removed AS SELECT * FROM removed_src")
        self.con.execute("CREATE VIEW images_all AS SELECT * FROM images_src")
        self.con.execute(
            """
            CREATE TABLE images AS
            SELECT i.* EXCLUDE (version), c.root || '/' || i.relpath AS path
            FROM (SELECT * FROM images_src QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY version DESC) = 1) i
            JOIN collections c USING (collection)
            WHERE i.image_id NOT IN (
                SELECT r.image_id FROM removed_src r
                JOIN (SELECT image_id, max(version) AS v FROM images_src GROUP BY image_id) l USING (image_id)
                WHERE r.version >= l.v)
            ORDER BY image_id
            """
        )
        self.con.execute(
            """
            CREATE VIEW skipped AS
            SELECT s.collection, s.relpath, c.root || '/' || s.relpath AS path, s.size_bytes, s.mtime_ns, s.reason, s.at
            FROM (SELECT * FROM skipped_src
                  QUALIFY row_number() OVER (PARTITION BY collection, relpath ORDER BY version DESC) = 1) s
            JOIN collections c USING (collection)
            WHERE s.reason IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM images i WHERE i.collection = s.collection AND i.relpath = s.relpath)
            """
        )
        for table in ("color", "hashes", "embeddings", "labels", "thumbnails", "runs"):
            self.con.execute(f"CREATE VIEW {table} AS SELECT * FROM {_src(table)}")

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """All rows of a query (fetched in full, so the connection is free for the next one)."""
        return self.con.execute(query, params or []).fetchall()

    def one(self, query: str, params: list[Any] | None = None) -> Any:
        """The first value of the first row."""
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def arrow(self, query: str, params: list[Any] | None = None) -> pa.Table:
        return to_arrow(self.con.sql(query, params=params or None))

    def frame(self, query: str, params: list[Any] | None = None) -> pl.DataFrame:
        import polars as pl

        return pl.from_arrow(self.arrow(query, params))  # type: ignore[return-value]

    def count(self) -> int:
        return int(self.one("SELECT count(*) FROM images"))

    def close(self) -> None:
        self.con.close()


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A relation as an Arrow table (the method's name changed in DuckDB 2)."""
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fetch()


def sql_list(items: list[str]) -> str:
    """A SQL list literal of strings (for statements DuckDB cannot prepare, such as CREATE VIEW)."""
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _src(table: str) -> str:
    return f"{table}_src"
