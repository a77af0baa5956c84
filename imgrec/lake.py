"""The Parquet lake: append-only part files per table, made visible by immutable numbered snapshots, read through
DuckDB. The same protocol on a local folder and on S3-compatible object storage (``imgrec.storage``).

Layout of a lake (a folder, or ``s3://bucket/prefix``)::

    _snapshots/00000000000000000042.json   snapshot 42: the part files of every table, the model, next image id
    tables/<table>/part-<writer>-<seq>.parquet
    indexes/...                            search structures of one snapshot (imgrec.index), derived
    projections/, reports/                 maps and evaluations, derived

**Commit.** A writer writes its new parts (names unique to the writer and its commit: a retried write replaces
only its own file), then creates the next snapshot file *only if it does not exist* (an exclusive create on disk,
``If-None-Match: *`` on S3) listing the previous snapshot's parts plus its own. A reader takes the highest
snapshot and opens only the parts it lists: never a half-written part, and a crash at any point leaves the last
snapshot as it was. There is no rename and no lock.

**Several writers.** Two writers that both try to create snapshot N+1: exactly one succeeds. The other reads the
new latest snapshot and tries again on top of it: its image ids are moved past the ones the other writer took
(its parts are written again with the new ids), the images the other one already ingested from the same files
(same collection, path and bytes) are left out, and then it creates the snapshot after that. Nothing committed is
lost and no id is given twice (tests/test_lake.py).

**Garbage.** Files no snapshot of the last ``GRACE_S`` seconds lists, themselves older than that, are deleted by
the next writer: a reader or a writer still on a snapshot of the last ten minutes finds every part it needs.

Lakes written before snapshots (``manifest.json``, format 1) are read as they are; their next commit starts the
log.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrec.storage import StorageError, Store, fsync_dir, is_remote, open_store

if TYPE_CHECKING:  # polars, DuckDB and pyarrow are imported where used: a search by the index needs none of them
    import duckdb
    import polars as pl
    import pyarrow as pa

__all__ = ["Lake", "LakeConnection", "LakeError", "LakeWriter", "Manifest", "fsync_dir", "now", "schemas"]

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SNAPSHOTS = "_snapshots"
LEGACY_MANIFEST = "manifest.json"
GRACE_S = 600.0  # files of the snapshots of the last ten minutes are kept for their readers and writers
COMPACT_BELOW_BYTES = 64 * 1024 * 1024
MAX_CONFLICTS = 50  # commits retried on top of other writers' before giving up
CACHED_TABLES = ("collections", "images", "removed", "skipped", "labels", "runs")  # an S3 lake's small tables: its
# parts are downloaded once into the cache (they never change) and DuckDB reads them there; the others stream
NEW_ID_TABLES = ("images", "color", "color_layout", "hashes", "embeddings", "labels", "thumbnails")  # rows keyed by a new image_id


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


LAYOUT_DIMS = 928  # imgrec.features.color.LAYOUT_DIMS (not imported: the lake loads no image code)


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
        "color_layout": {"image_id": pl.Int64, "vector": pl.Array(pl.Float32, LAYOUT_DIMS)},
        "hashes": {"image_id": pl.Int64, "phash": pl.UInt64, "dhash": pl.UInt64},
        "embeddings": {"image_id": pl.Int64, "vector": pl.Array(pl.Float32, dim)},
        "labels": {
            "image_id": pl.Int64, "label": pl.Utf8, "labels": pl.List(pl.Utf8), "probs": pl.List(pl.Float32),
        },
        "thumbnails": {"image_id": pl.Int64, "thumb": pl.Binary},
        "runs": {"run_id": pl.Utf8, "started_at": ts, "finished_at": ts, "stats": pl.Utf8},
    }


TABLES = ("collections", "images", "removed", "skipped", "color", "color_layout", "hashes", "embeddings", "labels",
          "thumbnails", "runs")  # the keys of schemas(); a lake written before color_layout has none of its parts


class LakeError(RuntimeError):
    """Something about the lake a person must act on (built with another model, unreadable, ...)."""


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
        if d.get("format") not in READABLE_FORMATS:
            raise LakeError(f"lake format {d.get('format')} is not supported by this imgrec (format {FORMAT_VERSION})")
        return cls(
            snapshot=int(d["snapshot"]), next_image_id=int(d["next_image_id"]),
            tables={t: list(d["tables"].get(t, [])) for t in TABLES}, model=dict(d["model"]),
            color_bins=tuple(d["color_bins"]), thumb_size=int(d["thumb_size"]), garbage=list(d.get("garbage", [])),
            created_at=d["created_at"], updated_at=d["updated_at"],
        )


def snapshot_name(n: int) -> str:
    return f"{SNAPSHOTS}/{n:020d}.json"


def _location(root: str | os.PathLike[str]) -> str | Path:
    return str(root).rstrip("/") if is_remote(root) else Path(root).expanduser().resolve()


class Lake:
    """A lake: a local folder or an ``s3://`` location. Reading needs nothing but the store; writing goes through
    ``Lake.writer()``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.store: Store = open_store(_location(root))
        self.remote = self.store.remote
        self.url = self.store.url
        #: a local lake's folder (a Path); an S3 lake's URL (a str): for messages and for local-only code
        self.root: Any = self.store.local_path() if not self.remote else self.url

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    @property
    def exists(self) -> bool:
        return self._latest_name() is not None

    def _latest_name(self) -> str | None:
        if not self.remote and self.root.exists() and not self.root.is_dir():
            raise LakeError(f"{self.root} is a file, not a lake folder")
        names = [e.path for e in self.store.list(SNAPSHOTS) if e.path.endswith(".json")
                 and e.path.rsplit("/", 1)[-1][:-5].isdigit()]
        if names:
            return max(names)
        return LEGACY_MANIFEST if self.store.exists(LEGACY_MANIFEST) else None

    def manifest(self) -> Manifest | None:
        """The latest snapshot (None for a lake not created yet)."""
        for _ in range(5):
            name = self._latest_name()
            if name is None:
                return None
            try:
                return Manifest.from_json(json.loads(self.store.read_bytes(name)))
            except FileNotFoundError:  # collected between the listing and the read: list again
                continue
            except ValueError as exc:
                raise LakeError(f"the snapshot {self.store.join(name)} cannot be read: {exc}") from exc
        raise LakeError(f"the snapshots of {self.url} keep changing under this reader; try again")

    def snapshot(self) -> int:
        m = self.manifest()
        return m.snapshot if m else -1

    def local_dir(self, sub: str) -> Path:
        """Where derived files (``indexes``, ``projections``, ``reports``) live on this machine: in the lake's
        folder, or for an S3 lake in imgrec's cache (``IMGREC_CACHE``), mirrored from and to the lake
        (``pull`` / ``push``)."""
        if not self.remote:
            return self.root / sub
        import hashlib

        from imgrec.config import cache_dir

        return cache_dir() / "lakes" / hashlib.blake2b(self.url.encode(), digest_size=8).hexdigest() / sub

    def push(self, local: Path) -> None:
        """Upload a file of ``local_dir(...)`` to the same place in an S3 lake (nothing to do for a local one)."""
        if self.remote:
            rel = local.relative_to(self.local_dir("")).as_posix()
            self.store.put_file(_copy_to_scratch(local, self.store), rel)

    def pull(self, rel: str) -> Path:
        """The local copy of the lake's file ``rel`` (downloaded for an S3 lake); FileNotFoundError if none."""
        local = self.local_dir("") / rel
        if self.remote:
            self.store.get_file(rel, local)
        elif not local.is_file():
            raise FileNotFoundError(local)
        return local

    def cached_part(self, rel: str) -> Path:
        """A local copy of one of an S3 lake's part files (parts never change once written: fetched once)."""
        local = self.local_dir("parts") / rel
        if not local.is_file():
            self.store.get_file(rel, local)
        return local

    # --- reading -------------------------------------------------------------------------------------------------

    def connect(self, manifest: Manifest | None = None) -> LakeConnection:
        """An in-process DuckDB connection with one view per table, pinned to one snapshot."""
        return LakeConnection(self, manifest or self.manifest())

    # --- writing -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self) -> Iterator[LakeWriter]:
        """A writer on the latest snapshot. Several may write at once (see the module's docstring)."""
        if not self.remote:
            if self.root.exists() and not self.root.is_dir():
                raise LakeError(f"the lake {self.root} is a file, not a folder")
            self.root.mkdir(parents=True, exist_ok=True)
        w = LakeWriter(self)
        w.collect_garbage()
        yield w


def _copy_to_scratch(local: Path, store: Store) -> Path:
    import shutil

    tmp = store.scratch() / f"{uuid.uuid4().hex}-{local.name}"
    shutil.copyfile(local, tmp)
    return tmp


class LakeWriter:
    """Commits batches of rows atomically, on top of whatever other writers committed meanwhile."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self.base: Manifest | None = lake.manifest()  # the snapshot this writer's next commit builds on
        self.writer_id = uuid.uuid4().hex[:12]
        self.seq = 0
        self.id_shift = 0  # how far other writers' commits pushed the new image ids of the last commit
        self.conflicts = 0

    @property
    def manifest(self) -> Manifest | None:
        return self.base

    def create(self, model: dict[str, Any], color_bins: tuple[int, int, int], thumb_size: int) -> Manifest:
        """Start an empty lake (snapshot 0) with one empty part per table, so every view has a schema. Another
        writer that created it first wins; its lake is used if it has the same model."""
        import polars as pl

        stamp = now().isoformat()
        bins = color_bins[0] * color_bins[1] * color_bins[2]
        sch = schemas(bins, int(model["dim"]))
        parts = {t: [self._write_part(t, pl.DataFrame(schema=sch[t]), 0)] for t in TABLES}
        m = Manifest(0, 0, parts, model, tuple(color_bins), thumb_size, [], stamp, stamp)
        if self.lake.store.create(snapshot_name(0), _encode(m)):
            self.base = m
            return m
        theirs = self.lake.manifest()
        if theirs is None or theirs.model.get("name") != model.get("name"):
            raise LakeError(f"another writer created {self.lake.url} with another model meanwhile")
        # this writer numbered its images from 0, as on an empty lake, and the other writer may have committed
        # some already: the next commit builds on the empty lake, so it is moved on top of theirs like any lost race
        # (its ids past theirs, the files they ingested left out)
        self.base = replace(theirs, snapshot=-1, next_image_id=0)
        return theirs

    def _write_part(self, table: str, df: pl.DataFrame, snapshot: int) -> str:
        self.seq += 1
        rel = f"tables/{table}/part-{self.writer_id}-{self.seq:06d}.parquet"
        tmp = self.lake.store.scratch() / f"{self.writer_id}-{self.seq:06d}-{table}.parquet"
        df.write_parquet(tmp, compression="zstd", statistics=True, row_group_size=16384)
        self.lake.store.put_file(tmp, rel)
        return rel

    def _publish(self, make: Callable[[Manifest], Manifest | None]) -> Manifest | None:
        """Create the snapshot ``make(latest)`` after the latest one, again on top of the newer one after each
        lost race; None if ``make`` gives up."""
        base = self.base
        for _ in range(MAX_CONFLICTS):
            if base is None:
                raise LakeError("the lake has not been created yet")
            new = make(base)
            if new is None:
                return None
            if self.lake.store.create(snapshot_name(new.snapshot), _encode(new)):
                self.base = new
                return new
            self.conflicts += 1
            time.sleep(0.01 * min(self.conflicts, 20))
            base = self.lake.manifest()
        raise LakeError(f"could not commit to {self.lake.url}: {MAX_CONFLICTS} other commits came first")

    def commit(self, frames: dict[str, pl.DataFrame], next_image_id: int | None = None) -> Manifest:
        """Write every non-empty frame as a new part and publish them all in one new snapshot.

        ``next_image_id``: the first id the caller has not used. Ids from the base snapshot's ``next_image_id`` on
        are this commit's new images; where other writers took those ids first they are moved up past theirs
        (``id_shift``: by how much, for this commit); the caller goes on from ``manifest.next_image_id``.
        """
        start = self.base
        if start is None:
            raise LakeError("the lake has not been created yet")
        sch = schemas(start.bins, int(start.model["dim"]))
        state: dict[str, Any] = {"base": start, "frames": {t: df for t, df in frames.items() if df.height},
                                 "parts": None, "shift": 0}

        def make(latest: Manifest) -> Manifest:
            if latest.snapshot != state["base"].snapshot:  # another writer came first: on top of its snapshot
                state["frames"], shift = self._rebase(state["frames"], state["base"], latest)
                state["shift"] += shift
                state["base"], state["parts"] = latest, None
            if state["parts"] is None:  # (versions are snapshot numbers: the parts are written for this one)
                state["parts"] = {
                    t: self._write_part(t, _with_version(df, latest.snapshot + 1).select(list(sch[t])).cast(sch[t]),
                                        latest.snapshot + 1)
                    for t, df in state["frames"].items() if df.height}
            tables = {t: list(v) + ([state["parts"][t]] if t in state["parts"] else [])
                      for t, v in latest.tables.items()}
            used = next_image_id + state["shift"] if next_image_id is not None else latest.next_image_id
            return Manifest(latest.snapshot + 1, max(used, latest.next_image_id), tables, latest.model,
                            latest.color_bins, latest.thumb_size, [], latest.created_at, now().isoformat())

        new = self._publish(make)
        assert new is not None
        self.id_shift = state["shift"]
        return new

    def _rebase(self, frames: dict[str, pl.DataFrame], base: Manifest, latest: Manifest
                ) -> tuple[dict[str, pl.DataFrame], int]:
        """This commit's rows moved on top of ``latest``: new image ids (from ``base.next_image_id``) past the ones
        other writers took meanwhile, and the images they already ingested from the same files left out; and the
        shift of the ids."""
        import polars as pl

        first_new = base.next_image_id
        shift = max(0, latest.next_image_id - first_new)
        if shift:
            frames = {t: (df.with_columns(pl.when(pl.col("image_id") >= first_new)
                                          .then(pl.col("image_id") + shift).otherwise(pl.col("image_id"))
                                          .alias("image_id"))
                          if t in (*NEW_ID_TABLES, "removed") and "image_id" in df.columns else df)
                      for t, df in frames.items()}
        images = frames.get("images")
        cols = frames.get("collections")
        if (images is None or not images.height) and (cols is None or not cols.height):
            return frames, shift
        conn = self.lake.connect(latest)
        try:
            done = conn.frame("SELECT collection, relpath, content_hash FROM images")
            have = conn.frame("SELECT collection, root FROM collections")
        finally:
            conn.close()
        if images is not None and images.height:
            dup = images.join(done, on=["collection", "relpath", "content_hash"], how="semi")["image_id"]
            if dup.len():  # the other writer ingested these very files: its rows stay, these go
                frames = {t: (df.filter(~pl.col("image_id").is_in(dup.implode()))
                              if t in NEW_ID_TABLES and "image_id" in df.columns else df)
                          for t, df in frames.items()}
        if cols is not None and cols.height:
            clash = cols.join(have, on="collection", how="inner").filter(pl.col("root") != pl.col("root_right"))
            if clash.height:
                raise LakeError(f"another writer registered the collection name {clash['collection'][0]!r} for "
                                "another folder meanwhile; run the ingestion again (it will pick another name)")
            frames["collections"] = cols.join(have, on="collection", how="anti")
        return frames, shift

    def compact(self) -> Manifest | None:
        """Merge the small parts of each table into one (sorted by image_id where it has one), in a snapshot of
        its own; given up (None) when another writer's commit replaced those parts meanwhile."""
        m = self.base
        if m is None:
            return m
        sizes = {e.path: e.size for e in self.lake.store.list("tables")}
        plan = {t: [p for p in parts if sizes.get(p, 0) < COMPACT_BELOW_BYTES] for t, parts in m.tables.items()}
        plan = {t: small for t, small in plan.items() if len(small) >= 2}
        if not plan:
            return m
        import duckdb

        con = duckdb.connect()
        merged = {}
        try:
            for table, small in plan.items():
                self.seq += 1
                rel = f"tables/{table}/part-{self.writer_id}-{self.seq:06d}.parquet"
                tmp = self.lake.store.scratch() / f"{self.writer_id}-{self.seq:06d}-{table}.parquet"
                _register(con, "src", self.lake, small)
                order = " ORDER BY image_id" if "image_id" in schemas()[table] else ""
                con.execute(f"COPY (SELECT * FROM src{order}) TO '{tmp}' "
                            "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 16384)")
                con.execute("DROP VIEW IF EXISTS src")
                self.lake.store.put_file(tmp, rel)
                merged[table] = rel
        finally:
            con.close()

        def make(latest: Manifest) -> Manifest | None:
            tables = {t: list(v) for t, v in latest.tables.items()}
            for table, small in plan.items():
                if not set(small) <= set(tables[table]):
                    return None  # rewritten by another writer meanwhile: leave it
                tables[table] = [p for p in tables[table] if p not in small] + [merged[table]]
            return replace(latest, snapshot=latest.snapshot + 1, tables=tables, garbage=[],
                           updated_at=now().isoformat())

        return self._publish(make)

    def collect_garbage(self, grace_s: float = GRACE_S) -> None:
        """Delete the files no recent snapshot lists (crash leftovers, parts replaced by a compaction, snapshot
        files), once they are older than ``grace_s`` seconds."""
        store = self.lake.store
        latest = self.lake._latest_name()
        if latest is None:
            return
        cutoff = time.time_ns() - int(grace_s * 1e9)
        snaps = sorted(store.list(SNAPSHOTS), key=lambda e: e.path)
        live: set[str] = set()
        for e in snaps:
            if e.path == latest or e.mtime_ns >= cutoff:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    live |= {p for parts in json.loads(store.read_bytes(e.path))["tables"].values() for p in parts}
        if latest == LEGACY_MANIFEST:  # a lake from before the snapshot log
            live |= {p for parts in json.loads(store.read_bytes(LEGACY_MANIFEST))["tables"].values() for p in parts}
        elif snaps and snaps[0].mtime_ns < cutoff and store.exists(LEGACY_MANIFEST):
            store.delete(LEGACY_MANIFEST)  # the log has taken over for long enough
        for e in store.list("tables"):
            if e.path not in live and e.mtime_ns < cutoff:
                store.delete(e.path)
        for e in snaps:
            if e.path != latest and e.mtime_ns < cutoff:
                store.delete(e.path)
        if not self.lake.remote:
            for e in store.list(".scratch"):
                if e.mtime_ns < cutoff:
                    store.delete(e.path)


def _encode(m: Manifest) -> bytes:
    return json.dumps(m.to_json(), indent=1).encode()


def _with_version(df: pl.DataFrame, snapshot: int) -> pl.DataFrame:
    import polars as pl

    return df.with_columns(pl.lit(snapshot, dtype=pl.Int64).alias("version")) if "version" in df.columns else df


def _register(con: Any, name: str, lake: Lake, parts: list[str]) -> Any:
    """A view ``name`` over the Parquet ``parts`` of the lake: read_parquet on disk; on S3 a pyarrow dataset through
    the store's filesystem (DuckDB cannot fetch its S3 extension here, and needs none this way), returned: it is
    registered on the connection, and must be on each of its cursors too (``LakeConnection.cursor``)."""
    if not lake.remote:
        files = [str(lake.root / p) for p in parts]
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({sql_list(files)})")
        return None
    import pyarrow.dataset as ds

    fs, root = lake.store.arrow()
    try:
        dataset = ds.dataset([f"{root}/{p}" for p in parts], filesystem=fs, format="parquet")
    except OSError as exc:
        raise StorageError(f"cannot read the lake's parts on {lake.url}: {exc}") from exc
    con.register(f"{name}_arrow", dataset)
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {name}_arrow")
    return dataset


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
        self._datasets: dict[str, Any] = {}  # an S3 lake's tables, registered on every cursor
        sch = schemas(manifest.bins, int(manifest.model["dim"])) if manifest else schemas()
        for table in TABLES:
            parts = manifest.tables[table] if manifest else []
            if parts and lake.remote and table in CACHED_TABLES:  # immutable parts: read from a local copy
                files = [str(lake.cached_part(p)) for p in parts]
                self.con.execute(f"CREATE VIEW {_src(table)} AS SELECT * FROM read_parquet({sql_list(files)})")
            elif parts:
                dataset = _register(self.con, _src(table), lake, parts)
                if dataset is not None:
                    self._datasets[f"{_src(table)}_arrow"] = dataset
            else:
                empty = pl.DataFrame(schema=sch[table]).to_arrow()  # noqa: F841 (read by DuckDB below)
                self.con.execute(f"CREATE TABLE {_src(table)} AS SELECT * FROM empty")
        self.con.execute("CREATE VIEW collections AS SELECT collection, any_value(root) AS root, min(added_at) AS added_at "
                         "FROM collections_src GROUP BY collection")  # a name registered twice counts once
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
        for table in ("color", "color_layout", "hashes", "embeddings", "labels", "thumbnails", "runs"):
            self.con.execute(f"CREATE VIEW {table} AS SELECT * FROM {_src(table)}")

    def cursor(self) -> Any:
        """A DuckDB cursor over the same snapshot (for another thread)."""
        cur = self.con.cursor()
        for name, dataset in self._datasets.items():
            cur.register(name, dataset)
        return cur

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
