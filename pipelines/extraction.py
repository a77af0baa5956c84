"""The per-file work of an ingestion, as the worker processes (``pipelines.workers``) and Ray's tasks and actors
(``pipelines.distributed``) run it: read a file (refused if it changes while read), decode it and extract its
features, embed the crops of a chunk; every error caught per file and returned as its reason. The driver
(``pipelines.ingest``) plans the tasks and commits what comes back."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from imgrec.features.embed import ModelSpec
from imgrec.features.extract import HandFeatures, content_hash, decode_side, extract
from imgrec.imaging import ImageError, read_file


@dataclass(frozen=True)
class Task:
    collection: str
    relpath: str
    path: str
    size: int
    mtime_ns: int
    old_id: int | None = None
    old_hash: str | None = None
    old_meta: tuple[Any, ...] | None = None  # width, height, format, mode of the current version


_W: dict[str, Any] = {}
Done = tuple[Task, str, "HandFeatures | None", "str | None", float]  # task, content hash, features, reason, read s


def _init_worker(model: ModelSpec, bins: tuple[int, int, int], thumb: int, max_pixels: int,
                 reusable: frozenset[str], max_bytes: int | None = None, embed_threads: int | None = None) -> None:
    """``embed_threads``: embed each chunk's crops here, with ONNX Runtime on that many threads (None: the crops go
    back to the main process, which embeds them: torch, on a GPU)."""
    _W.update(model=model, bins=bins, thumb=thumb, max_pixels=max_pixels, reusable=reusable,
              min_side=decode_side(model), max_bytes=max_bytes, embed_threads=embed_threads, embedder=None)


def _work_chunk(tasks: list[Task]) -> list[Done]:
    """Read and extract a chunk of files, then embed their crops in one batch where this process embeds."""
    t0 = time.process_time()
    done = [_work(t) for t in tasks]
    if _W.get("embed_threads") is not None:
        def embedder() -> Any:
            if _W["embedder"] is None:
                from imgrec.features.runtime import OnnxEmbedder

                _W["embedder"] = OnnxEmbedder(_W["model"].name, threads=_W["embed_threads"])
            return _W["embedder"]

        embed_crops(done, lambda crops: embedder().embed(crops))
    cpu = (time.process_time() - t0) / max(1, len(tasks))
    for _, _, f, _, _ in done:
        if f is not None:
            f.timings["cpu"] = cpu
    return done


def embed_crops(done: list[Done], embed: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Embeds the crops of extracted files in place, in one ``embed`` call (none without a crop), the time shared
    out as each image's ``embed`` stage."""
    todo = [f for _, _, f, _, _ in done if f is not None and f.crop is not None]
    if not todo:
        return
    t0 = time.perf_counter()
    emb, top_i, top_p = embed(np.stack([f.crop for f in todo]))
    share = (time.perf_counter() - t0) / len(todo)
    for j, f in enumerate(todo):
        f.emb, f.top_i, f.top_p, f.crop = emb[j], top_i[j], top_p[j], None
        f.timings["embed"] = share


def _crashed(task: Task, reason: str) -> Done:
    """The result of a file whose worker died twice while it held it."""
    return task, "", None, reason, 0.0


def _work(task: Task, reuse: bool = True) -> Done:
    """Read and extract one file: (task, content hash, features or None, error reason or None, read seconds)."""
    t0 = time.perf_counter()
    try:  # never blocks on a FIFO put in the file's place; refuses a file that changes while it is read
        if task.path.startswith("s3://"):
            data, size, mtime_ns = _read_object(task, _W.get("max_bytes"))
        else:
            data, st = read_file(task.path, _W.get("max_bytes"))
            size, mtime_ns = st.st_size, st.st_mtime_ns
    except OSError as exc:
        return task, "", None, f"cannot read file: {exc.strerror or exc}", time.perf_counter() - t0
    except ImageError as exc:
        return task, "", None, str(exc), time.perf_counter() - t0
    if (size, mtime_ns) != (task.size, task.mtime_ns):  # changed since the walk: record what was read
        task = replace(task, size=size, mtime_ns=mtime_ns)
    read_s = time.perf_counter() - t0
    chash = content_hash(data)
    if reuse and (chash == task.old_hash or chash in _W["reusable"]):
        return task, chash, None, None, read_s  # same bytes as an image already in the lake: relink, no decode
    _fault_injection(task)
    try:
        feats = extract(data, model=_W["model"], bins=_W["bins"], thumb_size=_W["thumb"],
                        max_pixels=_W["max_pixels"], min_side=_W["min_side"])
    except ImageError as exc:
        return task, chash, None, str(exc), read_s
    except Exception as exc:  # never let one file stop the run
        return task, chash, None, f"unexpected decoder error: {exc.__class__.__name__}: {exc}", read_s
    return task, chash, feats, None, read_s


_STORES: dict[tuple[int, str], Any] = {}  # per process (s3fs does not survive a fork) and bucket


def _read_object(task: Task, max_bytes: int | None) -> tuple[bytes, int, int]:
    """An S3 object's bytes, its size and modification time (those of the listing, unless it was replaced
    meanwhile: then asked again)."""
    from imgrec.storage import open_store

    if max_bytes is not None and task.size > max_bytes:
        raise ImageError(f"file too large: {task.size:,} bytes is over the limit of {max_bytes:,}", "too_large")
    bucket = task.path.removeprefix("s3://").split("/", 1)[0]
    key = (os.getpid(), bucket)
    store = _STORES.get(key) or _STORES.setdefault(key, open_store(f"s3://{bucket}"))
    rel = task.path.removeprefix(f"s3://{bucket}/")
    data = store.read_bytes(rel)
    if len(data) == task.size:
        return data, task.size, task.mtime_ns
    newer = {e.path: e for e in store.list(rel)}.get(rel)  # replaced after the listing: what was read
    return data, len(data), newer.mtime_ns if newer else task.mtime_ns


FAULT_ENV = "IMGREC_FAULT_CRASH_ON"  # tests: a worker process decoding a file of this name dies with SIGSEGV


def _fault_injection(task: Task) -> None:
    """Stand-in for a native decoder crash, for the tests of the worker pool (never set otherwise)."""
    name = os.environ.get(FAULT_ENV)
    if name and task.relpath.endswith(name) and mp.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGSEGV)
