"""Ingestion: walk -> read + decode + hand features (worker processes) -> embed (batches) -> commit (atomic parts).

Incremental: a file whose size and modification time are unchanged is not read again; a changed file is re-read, and
if its bytes are unchanged (only touched) or equal those of a file that disappeared in the same run (moved or
renamed), it keeps its ``image_id`` and nothing is recomputed. New content gets a new ``image_id``; the old version is
marked removed. Files that cannot be read are recorded in ``skipped`` with the reason and not retried until they change.

Resumable: rows are committed every ``config.commit_every`` images as one atomic snapshot, in the walk's sorted order,
so a run killed at any point resumes with the next file and assigns the same ids an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from imgrec.config import Config
from imgrec.features.embed import ModelSpec, spec
from imgrec.features.extract import HandFeatures
from imgrec.features.runtime import ensure_onnx, ensure_weights
from imgrec.index import current_dir
from imgrec.lake import Lake, LakeError, LakeWriter, Manifest, now
from pipelines.extraction import (
    Task,
    _crashed,
    _init_worker,
    _work,
    _work_chunk,
)
from pipelines.walk import walk_any
from pipelines.workers import WorkerPool

Progress = Callable[[int, int], None]
CHUNK = 16  # files a worker process handles (and embeds) at a time
EARLY_COMMIT = 48  # searchable_early: images of the first commit (and index), so a search finds some within seconds
_META = ("width", "height", "format", "mode")


@dataclass
class IngestReport:
    lake: str
    scanned: int = 0
    processed: int = 0  # images whose features were computed
    unchanged: int = 0
    relinked: int = 0  # touched or moved files that kept their image_id, nothing recomputed
    skipped: int = 0  # unreadable files found in this run
    removed: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (worker stages summed over workers)
    workers: int = 1  # decoding processes (local), or the CPUs left to the decoding tasks (ray)
    engine: str = "local"
    nodes: int = 1  # machines of the run (ray: the cluster's nodes alive at its start)
    embed_actors: int = 0  # ray: actors of the embedding pool
    device: str = "cpu"
    backend: str = "torch"
    cpu_busy: float | None = None  # CPU time of the run (all processes) / (wall time x cores), while processing
    worker_restarts: int = 0  # worker processes that died (a decoder crash, the OOM killer) and were replaced
    interrupted: bool = False
    snapshot: int = -1

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(self.stages.items(), key=lambda kv: -kv[1]))
        state = "interrupted (run again to resume)" if self.interrupted else "done"
        return (
            f"{state}: {self.scanned} files seen, {self.processed} ingested ({self.images_per_s:.1f} images/s), "
            f"{self.unchanged} unchanged, {self.relinked} moved/touched, {self.skipped} skipped, "
            f"{self.removed} removed; snapshot {self.snapshot}\n  stages: {stages}"
        )


class _Batch:
    """Rows waiting for the next commit."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.crops: list[tuple[int, np.ndarray]] = []
        self.images = 0

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.rows[table].append(row)

    def frames(self, schema: dict[str, dict[str, pl.DataType]]) -> dict[str, pl.DataFrame]:
        out = {}
        for table, rows in self.rows.items():
            cols = schema[table]
            data = {c: [r.get(c) for r in rows] for c in cols}
            out[table] = pl.DataFrame(data, schema=cols)
        return out


def _root(r: str | os.PathLike[str]) -> Path | str:
    if str(r).startswith("s3://"):
        return str(r).rstrip("/")
    return Path(os.path.abspath(Path(r).expanduser()))


def _collection_names(roots: Sequence[Path | str], existing: dict[str, str]) -> dict[Path | str, str]:
    by_root = {_root(r): n for n, r in existing.items()}
    taken = set(existing)
    out: dict[Path | str, str] = {}
    for root in roots:
        if root in by_root:
            out[root] = by_root[root]
            continue
        base = (root.name if isinstance(root, Path) else root.rsplit("/", 1)[-1]) or "root"
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        out[root] = name
    return out


def ingest(
    roots: Iterable[str | os.PathLike[str]],
    config: Config,
    *,
    progress: bool = True,
    on_progress: Progress | None = None,
    build_index: bool = True,
    searchable_early: bool = False,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> IngestReport:
    """Ingest (or update) every image below ``roots`` into ``config.lake``; returns what was done.

    Setting ``stop`` (or Ctrl-C / SIGTERM in the main thread) ends the run early: what is finished is committed,
    and the next run resumes from there (``report.interrupted``). ``searchable_early`` (a lake with no search index
    yet): the first ``EARLY_COMMIT`` images are committed and indexed at once, and the index is brought up to date
    again each time the committed images have doubled, so a search (the app) finds images while the run goes on.
    """
    # absolute, but symlinks kept as the person wrote them, so result paths read as they know them; s3:// roots as
    # they are (without a trailing slash)
    roots = list(dict.fromkeys(_root(r) for r in roots))
    for r in roots:
        if isinstance(r, Path) and not r.is_dir():
            raise NotADirectoryError(f"{r} is not a folder")
    model = spec(config.model)
    ensure_weights(model)  # a model that cannot be had: one line, before the lake is touched
    lake = Lake(config.lake)
    report = IngestReport(lake=str(lake.root))
    from pipelines.backfill import backfill_layout

    backfill_layout(config, progress=progress, log=log, stop=stop)  # lakes ingested before the colour layout
    t_start = time.perf_counter()
    started_at = now()
    stages: dict[str, float] = defaultdict(float)

    with lake.writer() as writer:
        manifest = writer.manifest
        if manifest is not None and manifest.model.get("name") != model.name:
            raise LakeError(
                f"this lake was built with the model {manifest.model.get('name')!r}; ingest with --model "
                f"{manifest.model.get('name')} or use another lake for {model.name!r}"
            )
        # --- plan: what changed since the last snapshot -------------------------------------------------------
        t0 = time.perf_counter()
        conn = lake.connect(manifest)
        existing = dict(conn.sql("SELECT collection, root FROM collections"))
        names = _collection_names(roots, existing)
        batch = _Batch()
        for root, name in names.items():
            if name not in existing:
                batch.add("collections", {"collection": name, "root": str(root), "added_at": now()})
        tasks: list[Task] = []
        deleted: dict[str, dict[str, Any]] = {}  # content hash -> row of an image whose file disappeared
        gone: list[dict[str, Any]] = []
        walk_errors: list[tuple[str, str, str]] = []
        for root, name in names.items():
            known = {r["relpath"]: r for r in conn.frame(
                "SELECT * FROM images WHERE collection = ?", [name]).iter_rows(named=True)}
            bad = {r[0]: (r[1], r[2]) for r in conn.sql(
                "SELECT relpath, size_bytes, mtime_ns FROM skipped WHERE collection = ?", [name])}
            bad_reason = dict(conn.sql("SELECT relpath, reason FROM skipped WHERE collection = ?", [name]))
            seen: set[str] = set()
            errs: list[tuple[str, str]] = []
            for rec in walk_any(root, errs):
                seen.add(rec.relpath)
                report.scanned += 1
                old = known.get(rec.relpath)
                if old is not None and old["size_bytes"] == rec.size and old["mtime_ns"] == rec.mtime_ns:
                    report.unchanged += 1
                    continue
                if old is None and bad.get(rec.relpath) == (rec.size, rec.mtime_ns):
                    continue  # known unreadable and unchanged
                tasks.append(Task(name, rec.relpath, rec.path, rec.size, rec.mtime_ns,
                                  old["image_id"] if old else None, old["content_hash"] if old else None,
                                  tuple(old[k] for k in _META) if old else None))
            # a walk error already recorded with the same reason is not recorded again (no commit for nothing)
            walk_errors += [(name, rel, why) for rel, why in errs if bad_reason.get(rel) != why
                            or bad.get(rel) != (None, None)]
            for rel, row in known.items():
                if rel not in seen:
                    gone.append(row)
                    deleted.setdefault(row["content_hash"], row)
            failed = {rel for rel, _ in errs}
            for rel in bad:
                if rel not in seen and rel not in failed:  # an unreadable file that is gone: clear its record
                    batch.add("skipped", {"collection": name, "relpath": rel, "reason": None, "at": now()})
        for name, rel, why in walk_errors:
            batch.add("skipped", {"collection": name, "relpath": rel, "size_bytes": None, "mtime_ns": None,
                                  "reason": why, "at": now()})
            report.skipped += 1
        conn.close()
        stages["scan"] += time.perf_counter() - t0
        log(f"imgrec: {report.scanned} image files in {len(roots)} folder(s); {len(tasks)} to process, "
            f"{len(gone)} gone")

        # --- process ------------------------------------------------------------------------------------------
        state = _Runner(writer, manifest, config, model, batch, report, stages)
        if searchable_early and build_index and current_dir(lake) is None:
            _index_as_it_goes(state, config, stages, log)
        reusable = frozenset(deleted)
        bins = tuple(manifest.color_bins) if manifest else tuple(config.color_bins)
        thumb = manifest.thumb_size if manifest else config.thumb_size
        workers = max(1, min(config.workers, len(tasks)))
        report.workers = workers
        backend = state.choose_backend(log)
        distributed = config.engine == "ray" and bool(tasks)
        # ONNX Runtime on the CPU: each worker process embeds its own chunks, on its share of the cores; torch (a
        # GPU): the crops come back and this process embeds them in batches
        in_workers = backend == "onnx" and workers > 1 and not distributed
        if in_workers or (distributed and backend == "onnx"):
            ensure_onnx(model, log)  # exported once, before the workers start
        init_args = (model, bins, thumb, config.max_pixels, reusable, config.max_file_bytes,
                     max(1, _cores() // workers) if in_workers else None)
        stop = stop or threading.Event()
        _init_worker(*init_args[:-1])  # this process extracts a relinked file's twin (and everything, alone)
        with contextlib.ExitStack() as cleanup:
            pool = None
            if distributed:  # Ray is started (or joined) before the signal handlers: Ctrl-C stays this run's
                from pipelines import distributed as dist

                cluster = cleanup.enter_context(dist.session(config.ray_address or None, log))
                report.engine, report.nodes = "ray", cluster.nodes
                pools = dist.plan_pools(config, cluster, backend)
                report.embed_actors, report.workers = pools.embed_actors, pools.decode_cpus
                if state.checksum is None:  # the driver embeds nothing: the weights' identity without loading them
                    from imgrec.features.runtime import weights_checksum

                    state.checksum = weights_checksum(model)
                    state._check_weights(state.checksum)
                state.device = "cuda" if cluster.gpus else "cpu"
            cleanup.enter_context(_stop_on_signals(stop, log))
            cpu0, t_work = time.process_time(), time.perf_counter()
            if distributed:
                results = cleanup.enter_context(contextlib.closing(
                    dist.results(tasks, init_args[:-1], config, cluster, pools, backend, log)))
            elif workers > 1:
                # workers that read object storage are spawned, not forked: s3fs runs its requests on an event-loop
                # thread of this process, and a child forked while that thread held a lock waited on it for ever
                start = "spawn" if any(t.path.startswith("s3://") for t in tasks) else "fork"
                pool = cleanup.enter_context(WorkerPool(
                    workers, _work_chunk, _crashed, initializer=_init_worker, initargs=init_args,
                    item_timeout_s=config.file_timeout_s, start_method=start))
                chunk = max(1, min(config.batch_size, CHUNK))
                results = itertools.chain.from_iterable(pool.map(
                    tasks[i : i + chunk] for i in range(0, len(tasks), chunk)))
                state.threads = _EmbedThreads(_cores(), workers, config.embed_threads or None,
                                              lambda: pool.received >= len(tasks))
            else:
                results = map(_work, tasks)
                state.threads = _EmbedThreads(_cores(), 1, config.embed_threads or None, lambda: True)
            state.ensure_lake()
            bar = _bar(len(tasks), progress)
            done = 0
            try:
                for done, (task, chash, feats, reason, read_s) in enumerate(results, 1):
                    if stop.is_set():
                        report.interrupted = True
                        log(f"imgrec: stopped; committing the {done - 1} images handled so far")
                        break
                    stages["read"] += read_s
                    state.handle(task, chash, feats, reason, deleted)
                    bar.update(1)
                    if on_progress:
                        on_progress(done, len(tasks))
            except Exception:
                if not distributed:
                    raise
                state.flush()  # what the driver holds is complete: kept, and the next run resumes after it
                if not stop.is_set():
                    raise
                report.interrupted = True  # Ctrl-C reached the local Ray processes too
                log(f"imgrec: stopped; committed the {done} images handled so far")
            bar.close()
            if distributed:
                worker_cpu = None
                stages.pop("cpu", None)
            elif pool is not None:
                report.worker_restarts = pool.restarts
                worker_cpu = stages.pop("cpu", 0.0)
                if pool.restarts:
                    log(f"imgrec: {pool.restarts} worker process(es) died and were replaced; "
                        f"{pool.crashed} file(s) recorded as crashing the decoder")
            else:
                worker_cpu = 0.0
                stages.pop("cpu", None)
        wall = time.perf_counter() - t_work
        if wall > 0 and tasks and worker_cpu is not None:  # how much of the machine the run kept busy
            report.cpu_busy = round((time.process_time() - cpu0 + worker_cpu) / (wall * _cores()), 3)
        # files that disappeared and whose bytes did not reappear elsewhere
        if not report.interrupted:
            for row in gone:
                if row["image_id"] not in state.relinked_ids:
                    batch.add("removed", {"image_id": row["image_id"], "reason": "deleted", "removed_at": now()})
                    report.removed += 1
        changed = bool(batch.rows) or bool(batch.crops) or state.committed
        state.flush()
        if changed and not report.interrupted:
            t0 = time.perf_counter()
            writer.compact()
            stages["compact"] += time.perf_counter() - t0
        report.seconds = time.perf_counter() - t_start
        report.stages = {k: round(v, 3) for k, v in stages.items()}
        report.device = state.device
        if changed:  # the run's own row, in a last small commit; a run that changed nothing commits nothing
            batch.add("runs", {"run_id": uuid.uuid4().hex[:12], "started_at": started_at, "finished_at": now(),
                               "stats": json.dumps(report.to_json())})
            state.flush()
        report.snapshot = lake.snapshot()
    report.device = state.device
    if build_index and not report.interrupted:
        from pipelines.index import build_indexes

        t0 = time.perf_counter()
        build_indexes(config)
        stages["index"] += time.perf_counter() - t0
        report.stages = {k: round(v, 3) for k, v in stages.items()}
    return report


def _index_as_it_goes(state: _Runner, config: Config, stages: dict[str, float], log: Callable[[str], None]) -> None:
    """The first commit after ``EARLY_COMMIT`` images, then the usual cadence; the search index built after the
    first commit and again whenever the committed images have doubled (incremental: the whole run's index work
    stays linear in its size)."""
    from pipelines.index import build_indexes

    state.commit_every = min(config.commit_every, EARLY_COMMIT)
    indexed = [0]

    def on_commit(committed: int) -> None:
        state.commit_every = config.commit_every
        if committed < 2 * indexed[0]:
            return
        t0 = time.perf_counter()
        build_indexes(config)
        stages["index"] += time.perf_counter() - t0
        indexed[0] = committed
        log(f"imgrec: {committed} images searchable so far")

    state.on_commit = on_commit


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, log: Callable[[str], None]) -> Iterator[None]:
    """Ctrl-C or SIGTERM sets ``stop``: the run finishes the image in hand, commits, and returns. A second Ctrl-C
    stops at once (KeyboardInterrupt), leaving the lake at its last commit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log("imgrec: stopping after the current image (Ctrl-C again to stop at once)")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class _EmbedThreads:
    """torch's thread count for each CPU embedding batch in the main process, from measured milliseconds per image.

    While decoding workers run, the embedding gets the cores they leave (at least 1): with 2 workers on 2 cores, a
    second torch thread would wait at every layer for a core a worker holds. Where nothing of this run competes (no
    pool, or all its files done), 1 thread and every core are both tried and the faster kept, the other re-tried every
    ``PROBE_EVERY`` batches: on an idle machine 2 threads embed about 1.8x faster than 1, but where other processes
    share the cores they can be many times slower (each op waits for the second thread to get a core back; 25x at
    batch 2 with one other busy process on 2 cores). ``fixed`` (Config.embed_threads) turns the choice off. torch's own
    count is restored after each batch.
    """

    PROBE_EVERY = 8

    def __init__(self, cores: int, workers: int, fixed: int | None, workers_done: Callable[[], bool]) -> None:
        self.busy = [fixed or max(1, cores - workers)] if workers > 1 else []
        self.free = [fixed] if fixed else sorted({1, max(1, cores)})
        self.workers_done = workers_done
        self.ms: dict[int, float] = {}  # thread count -> smoothed ms per image in the current phase
        self.phase_busy = bool(self.busy)
        self.batches = 0

    @contextlib.contextmanager
    def batch(self, images: int) -> Iterator[None]:
        import torch

        saved, n = torch.get_num_threads(), self._pick()
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            torch.set_num_threads(saved)
        self._measured(n, time.perf_counter() - t0, images)

    def _pick(self) -> int:
        if self.phase_busy and self.workers_done():
            self.phase_busy = False
            self.ms.clear()  # measured while sharing the cores with the workers: not comparable
        options = self.busy if self.phase_busy else self.free
        untried = [n for n in options if n not in self.ms]
        if untried:
            return untried[0]
        if self.batches % self.PROBE_EVERY == 0:
            return max(options, key=self.ms.__getitem__)  # the slower one, in case the machine's load has changed
        return min(options, key=self.ms.__getitem__)

    def _measured(self, n: int, seconds: float, images: int) -> None:
        self.batches += 1
        if self.batches == 1 or images < 4:  # the first batch also pays oneDNN's one-off set-up; tiny ones are noise
            return
        ms = seconds * 1000 / images
        old = self.ms.get(n)
        self.ms[n] = ms if old is None else (old + ms) / 2


def _cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="ingest", disable=not enabled or total == 0, smoothing=0.1,
                dynamic_ncols=True)


class _Runner:
    """Turns worker results into rows, embeds in batches, and commits every ``commit_every`` images."""

    def __init__(self, writer: LakeWriter, manifest: Manifest | None, config: Config, model: ModelSpec,
                 batch: _Batch, report: IngestReport, stages: dict[str, float]) -> None:
        self.writer, self.manifest, self.config, self.model = writer, manifest, config, model
        self.batch, self.report, self.stages = batch, report, stages
        self.embedder: Any = None
        self.next_id = manifest.next_image_id if manifest else 0
        self.relinked_ids: set[int] = set()
        self.device = "cpu"
        self.committed = False
        self.threads: _EmbedThreads | None = None  # None: torch's own thread count
        self.backend = "torch"
        self.checksum: str | None = None  # of the weights, once known
        self._labels: tuple[str, ...] | None = None
        self.commit_every = config.commit_every
        self.images_committed = 0
        self.on_commit: Callable[[int], None] | None = None  # after each commit: the images committed so far

    def choose_backend(self, log: Callable[[str], None]) -> str:
        """What embeds this run (``imgrec.features.runtime.resolve``); the weights must be the lake's."""
        from imgrec.features.runtime import resolve, weights_checksum

        self.backend, why = resolve(self.config.backend, self.config.device, self.model.name)
        self.report.backend = self.backend
        if why:
            log(f"imgrec: {why}")
        if self.backend == "onnx":
            self.checksum = weights_checksum(self.model)
            self._check_weights(self.checksum)
        return self.backend

    def _check_weights(self, checksum: str) -> None:
        recorded = self.manifest.model.get("checksum") if self.manifest else None
        if recorded and recorded != checksum:
            raise LakeError(
                f"the weights of {self.model.name} differ from those this lake was built with "
                f"(checksum {checksum} vs {recorded}); use another lake"
            )

    def _embedder(self) -> Any:
        if self.embedder is None:
            from imgrec.features.embed import retain_freed_memory
            from imgrec.features.runtime import load_embedder

            t0 = time.perf_counter()
            retain_freed_memory()  # batches' activations reuse freed memory instead of page-faulting fresh mappings
            self.embedder = load_embedder(self.config.model, self.backend, self.config.device)
            self.device = self.embedder.device
            self.stages["model_load"] += time.perf_counter() - t0
            self.checksum = self.embedder.checksum
            self._check_weights(self.checksum)
        return self.embedder

    def labels(self) -> tuple[str, ...]:
        """ImageNet's class names (read once: the sidecar's JSON, parsed for every image, cost 0.5 ms of this
        process's CPU an image where the workers embed)."""
        if self._labels is None:
            if self.embedder is not None:
                self._labels = tuple(self.embedder.labels)
            else:
                from imgrec.features.runtime import label_names

                self._labels = label_names(self.model)
        return self._labels

    def ensure_lake(self) -> None:
        if self.manifest is None:
            checksum = self.checksum or self._embedder().checksum
            self.manifest = self.writer.create(
                {"name": self.model.name, "checksum": checksum, "dim": self.model.dim,
                 "resize": self.model.resize, "crop": self.model.crop},
                tuple(self.config.color_bins), self.config.thumb_size)

    def handle(self, task: Task, chash: str, feats: HandFeatures | None, reason: str | None,
               deleted: dict[str, dict[str, Any]]) -> None:
        b, r = self.batch, self.report
        base = {"collection": task.collection, "relpath": task.relpath, "file_name": task.relpath.rsplit("/", 1)[-1],
                "folder": task.relpath.rsplit("/", 1)[0] if "/" in task.relpath else "",
                "size_bytes": task.size, "mtime_ns": task.mtime_ns,
                "mtime": _ts(task.mtime_ns), "content_hash": chash, "ingested_at": now()}
        if reason is not None:
            b.add("skipped", {"collection": task.collection, "relpath": task.relpath, "size_bytes": task.size,
                              "mtime_ns": task.mtime_ns, "reason": reason, "at": now()})
            if task.old_id is not None:  # a file that was fine and is now unreadable
                b.add("removed", {"image_id": task.old_id, "reason": f"unreadable: {reason}", "removed_at": now()})
            r.skipped += 1
            return
        if feats is None:  # same bytes as an image of the lake: keep its id and features, recompute nothing
            src = None if chash == task.old_hash else deleted.pop(chash, None)
            if src is None and chash != task.old_hash:  # its twin was already relinked: extract after all
                task, chash, feats, reason, _ = _work(replace(task, old_hash=None), reuse=False)
                self.handle(task, chash, feats, reason, deleted)
                return
            meta = task.old_meta if src is None else tuple(src[k] for k in _META)
            image_id = task.old_id if src is None else src["image_id"]
            if src is not None:
                self.relinked_ids.add(image_id)
                if task.old_id is not None:
                    b.add("removed", {"image_id": task.old_id, "reason": "replaced", "removed_at": now()})
            b.add("images", {**base, "image_id": image_id, **dict(zip(_META, meta or (None,) * 4, strict=True))})
            r.relinked += 1
            b.images += 1
            self._maybe_commit()
            return
        image_id = self.next_id
        self.next_id += 1
        if task.old_id is not None:
            b.add("removed", {"image_id": task.old_id, "reason": "modified", "removed_at": now()})
        b.add("images", {**base, "image_id": image_id, "width": feats.width, "height": feats.height,
                         "format": feats.format, "mode": feats.mode})
        b.add("color", {"image_id": image_id, "hist": feats.hist})
        if feats.layout is not None:
            b.add("color_layout", {"image_id": image_id, "vector": feats.layout})
        b.add("hashes", {"image_id": image_id, "phash": int(feats.phash), "dhash": int(feats.dhash)})
        b.add("thumbnails", {"image_id": image_id, "thumb": feats.thumb})
        if feats.emb is not None:  # embedded by the worker process
            self._add_embedding(image_id, feats.emb, feats.top_i, feats.top_p)
        else:
            b.crops.append((image_id, feats.crop))
        for k, v in feats.timings.items():
            self.stages[k] += v
        r.processed += 1
        b.images += 1
        if len(b.crops) >= self.config.batch_size:
            self._embed()
        self._maybe_commit()

    def _embed(self) -> None:
        b = self.batch
        if not b.crops:
            return
        t0 = time.perf_counter()
        ids = [i for i, _ in b.crops]
        crops = np.stack([c for _, c in b.crops])
        embedder = self._embedder()
        cpu_threads = self.threads is not None and self.device == "cpu" and self.backend == "torch"
        with self.threads.batch(len(ids)) if cpu_threads else contextlib.nullcontext():  # type: ignore[union-attr]
            emb, top_i, top_p = embedder.embed(crops)
        for j, image_id in enumerate(ids):
            self._add_embedding(image_id, emb[j], top_i[j], top_p[j])
        b.crops.clear()
        self.stages["embed"] += time.perf_counter() - t0

    def _add_embedding(self, image_id: int, emb: np.ndarray, top_i: np.ndarray, top_p: np.ndarray) -> None:
        names = self.labels()
        labels = [names[int(k)] for k in top_i]
        self.batch.add("embeddings", {"image_id": image_id, "vector": emb})
        self.batch.add("labels", {"image_id": image_id, "label": labels[0], "labels": labels,
                                  "probs": [float(p) for p in top_p]})

    def _maybe_commit(self) -> None:
        if self.batch.images >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        self._embed()
        if not self.batch.rows:
            return
        self.ensure_lake()
        from imgrec.lake import schemas

        t0 = time.perf_counter()
        m = self.writer.manifest
        frames = self.batch.frames(schemas(m.bins, int(m.model["dim"])))
        committed = self.writer.commit(frames, next_image_id=self.next_id)
        self.next_id = committed.next_image_id  # moved up if another writer took these ids meanwhile
        self.committed = True
        self.images_committed += self.batch.images
        self.batch.rows.clear()
        self.batch.images = 0
        self.stages["write"] += time.perf_counter() - t0
        if self.on_commit is not None:
            self.on_commit(self.images_committed)


def _ts(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC).replace(tzinfo=None)
