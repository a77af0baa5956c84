"""The ``ray`` engine of ingestion: the per-image work of ``pipelines.ingest`` as a Ray Data job on a cluster.

The walk, the incremental plan and the commits stay on the driver (``ingest``): this module turns the plan's tasks
into a dataset of file references (pickled ``Task`` rows, never a listing by Ray) and runs the local engine's own
per-image code on the cluster, in one of two shapes (``plan_pools``): fused, a task per CPU that reads, decodes and
embeds its files in a supervised child process (``_decode_embed``), or split, CPU tasks that decode (``_extract``)
and a pool of embedding actors (``_Embed``: one model load per actor, ``num_gpus=1`` each where the cluster has
GPUs). Every error is caught per image and returned as a skipped row. Results come back in the plan's order, so the
driver assigns the same ``image_id``s and writes the same rows a local run would; a task lost with its node is run
again by Ray, and the driver drops a result it has already seen, so nothing is ingested twice.

``ray`` is imported only here, and only by a run with ``--engine ray``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgrec.config import Config
from imgrec.lake import LakeError
from imgrec.raycluster import connect

OOM_HINT = "lower --batch-size"
TASK_RETRIES = 3  # a decoding task whose worker or node dies is run again this many times
FAULT_OOM_ENV = "IMGREC_FAULT_EMBED_OOM"  # tests: an embedding actor raises torch's out-of-memory error


@dataclass(frozen=True)
class Cluster:
    """What the job runs on: CPUs and GPUs of the cluster, nodes alive, and whether this run started Ray."""

    cpus: int
    gpus: int
    nodes: int
    started: bool
    address: str


@contextlib.contextmanager
def session(address: str | None, log: Callable[[str], None]) -> Iterator[Cluster]:
    """Ray for one ingestion: connected to ``address`` (``auto``: the cluster this machine belongs to), or a local
    instance on 127.0.0.1 started here and stopped at the end; a process already connected (tests, notebooks) is
    used as it is."""
    ray, started = connect(address)
    try:
        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        info = Cluster(int(res.get("CPU", 0)), int(res.get("GPU", 0)), nodes, started,
                       address or ("local" if started else "connected"))
        if info.cpus < 1:
            raise LakeError("the Ray cluster has no CPUs for the decoding tasks")
        log(f"imgrec: Ray {'started locally' if started else 'cluster ' + info.address}: {info.nodes} node(s), "
            f"{info.cpus} CPUs, {info.gpus} GPUs")
        yield info
    finally:
        if started:  # (a connection to a cluster is left to Ray's exit handler: shutting it down here while Ray
            ray.shutdown()  # Data's threads wind down made the process exit with status 1 after a Ctrl-C)


@dataclass(frozen=True)
class Pools:
    """How the job uses the cluster: ``fused``: tasks (``embed_actors`` at a time, one per CPU) that read, decode
    and embed their files (ONNX Runtime on one thread each, as a local worker does); else CPU tasks decode and
    ``embed_actors`` actors embed."""

    fused: bool
    embed_actors: int
    decode_cpus: int


def plan_pools(config: Config, cluster: Cluster, backend: str = "onnx") -> Pools:
    """With GPUs (or the torch backend): CPU tasks decode, one embedding actor per GPU (or ``embed_actors``). CPU
    only (``ray_stages`` auto): fused, a task per CPU; on 2 cores the split stages left a core idle whenever the
    two stages' speeds differ. Split on CPUs: about 2 actors
    in 5 CPUs, always leaving the decoding one: actors that hold every CPU leave the decoding tasks waiting forever."""
    if config.ray_stages not in ("auto", "fused", "split"):
        raise LakeError(f"ray_stages must be auto, fused or split, not {config.ray_stages!r}")
    if config.ray_stages == "fused" and backend != "onnx":
        raise LakeError("fused Ray stages embed with ONNX Runtime: use --backend onnx, or split stages")
    if (cluster.gpus or backend != "onnx") and config.ray_stages != "fused":
        actors = config.embed_actors or cluster.gpus
        return Pools(False, actors, max(1, cluster.cpus - actors))
    if config.ray_stages != "split":
        actors = min(config.embed_actors or cluster.cpus, cluster.cpus)
        return Pools(True, actors, actors)
    if cluster.cpus < 2:
        raise LakeError("split Ray stages on a CPU-only cluster need at least 2 CPUs (one decodes, one embeds)")
    actors = min(config.embed_actors or max(1, round(cluster.cpus * 0.4)), cluster.cpus - 1)
    return Pools(False, actors, cluster.cpus - actors)


# --- worker side ----------------------------------------------------------------------------------------------------


def _ensure_worker(init: tuple[Any, ...]) -> Any:
    from pipelines import extraction as ing

    if ing._W.get("init") != init:  # once per worker process (and again for another job's settings)
        ing._init_worker(*init)
        ing._W["init"] = init
    return ing


def _extract(batch: dict[str, np.ndarray], init: tuple[Any, ...]) -> dict[str, np.ndarray]:
    """A CPU task: read and extract each file of the batch (``pipelines.extraction._work``), errors caught per image."""
    ing = _ensure_worker(init)
    out = [pickle.dumps(ing._work(pickle.loads(t)), protocol=5) for t in batch["task"]]
    return {"seq": batch["seq"], "done": np.array(out, dtype=object)}


class _Embed:
    """An actor of the embedding pool: the model loaded once; each batch's crops embedded in one call."""

    def __init__(self, model: str, backend: str, device: str, threads: int, batch_size: int,
                 fault_oom: bool = False) -> None:
        from imgrec.features.runtime import load_embedder

        self.batch_size, self.fault_oom = batch_size, fault_oom
        self.embedder = load_embedder(model, backend, device, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dones = [pickle.loads(d) for d in batch["done"]]
        self.embed(dones)
        return {"seq": batch["seq"], "done": np.array([pickle.dumps(d, protocol=5) for d in dones], dtype=object)}

    def embed(self, dones: list[Any]) -> None:
        """Embeds the crops of ``dones`` in place (``pipelines.extraction.embed_crops``); out of memory: the batch size
        to lower, in words."""
        from pipelines.extraction import embed_crops

        try:
            embed_crops(dones, self._embed)
        except Exception as exc:
            if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
                n = sum(d[2] is not None and d[2].crop is not None for d in dones)
                raise RuntimeError(
                    f"the embedding ran out of {self.embedder.device.upper()} memory on a batch of {n} "
                    f"images: {OOM_HINT} (now {self.batch_size}; try {max(1, self.batch_size // 2)})") from None
            raise

    def _embed(self, crops: np.ndarray) -> Any:
        if self.fault_oom:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.embedder.embed(crops)


_POOL: dict[str, Any] = {}  # per Ray worker process: the decoding child of the job in hand


def _decode_embed(batch: dict[str, np.ndarray], init: tuple[Any, ...], job: str, timeout_s: float,
                  chunk: int) -> dict[str, np.ndarray]:
    """A fused task: a local engine's worker, supervised. A child process (``WorkerPool`` of one, spawned once per
    Ray worker process and job, so the model loads once) reads, decodes, extracts and embeds the batch (ONNX
    Runtime, one thread, ``chunk`` images a call). A file that crashes the decoder natively kills the child, not
    the task: it is retried alone and recorded as skipped with the local engine's reason. Tasks, not actors: a task lost with its node is
    run again on any node, where an actor would wait for a CPU to restart on (none is free in a packed cluster)."""
    from pipelines import extraction as ing
    from pipelines.workers import WorkerPool

    if _POOL.get("job") != job:
        if "pool" in _POOL:
            _POOL.pop("pool").close()
        _POOL.update(job=job, pool=WorkerPool(1, ing._work_chunk, ing._crashed, initializer=ing._init_worker,
                                              initargs=(*init, 1), item_timeout_s=timeout_s, start_method="spawn"))
    tasks = [pickle.loads(t) for t in batch["task"]]  # to the child in embedding batches, two ahead: no idle gap
    dones = [d for part in _POOL["pool"].map(tasks[i : i + chunk] for i in range(0, len(tasks), chunk)) for d in part]
    return {"seq": batch["seq"], "done": np.array([pickle.dumps(d, protocol=5) for d in dones], dtype=object)}


# --- driver side ----------------------------------------------------------------------------------------------------


def results(tasks: Sequence[Any], init: tuple[Any, ...], config: Config, cluster: Cluster, pools: Pools,
            backend: str, log: Callable[[str], None]) -> Iterator[Any]:
    """The ``Done`` of every task, in the tasks' order, computed on the cluster as ``pools`` (``plan_pools``) says."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not tasks:
        return
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the driver assigns ids in the walk's order
    ctx.enable_progress_bars = False  # imgrec's own bar, per image
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False  # with reservations, a 2-CPU cluster's read tasks wait forever
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    use_gpu = cluster.gpus > 0 and not pools.fused
    per_task = max(1, min(config.ray_files_per_task, -(-len(tasks) // max(1, pools.decode_cpus * 4))))
    tables = [pa.table({"seq": pa.array(range(i, min(i + per_task, len(tasks))), pa.int64()),
                        "task": pa.array([pickle.dumps(t, protocol=5) for t in tasks[i : i + per_task]],
                                         pa.binary())})
              for i in range(0, len(tasks), per_task)]
    ds = ray.data.from_arrow(tables)
    embed = {"model": config.model, "backend": "torch" if use_gpu else backend, "device": "cuda" if use_gpu else "cpu",
             "threads": 1, "batch_size": config.batch_size, "fault_oom": bool(os.environ.get(FAULT_OOM_ENV))}
    with warnings.catch_warnings():  # retries: Ray 2.60's only way (its default, -1, retries a crash forever)
        warnings.simplefilter("ignore", DeprecationWarning)
        if pools.fused:
            ds = ds.map_batches(_decode_embed, batch_size=None, batch_format="numpy", num_cpus=1,
                                fn_kwargs={"init": init, "job": uuid.uuid4().hex, "timeout_s": config.file_timeout_s,
                                           "chunk": max(1, min(config.batch_size, 32))},
                                max_retries=TASK_RETRIES)  # one per CPU: Ray's own count (concurrency= left
            # 0.15-0.25 s between a task and the next, measured)
        else:
            ds = ds.map_batches(_extract, batch_size=None, batch_format="numpy", fn_kwargs={"init": init},
                                num_cpus=1, max_retries=TASK_RETRIES)
            ds = ds.map_batches(_Embed, batch_size=config.batch_size, batch_format="numpy",
                                fn_constructor_kwargs=embed, compute=ActorPoolStrategy(size=pools.embed_actors),
                                num_cpus=1, num_gpus=1 if use_gpu else 0)
    what = (f"{pools.embed_actors} at a time (1 CPU each) reading, decoding and embedding" if pools.fused else
            f"{pools.decode_cpus} CPUs decoding, {pools.embed_actors} embedding actor(s) "
            f"({'1 GPU' if use_gpu else '1 CPU'} each)")
    log(f"imgrec: {len(tasks)} files in {len(tables)} Ray tasks; {what}")
    seen = -1
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for seq, blob in zip(batch["seq"], batch["done"], strict=True):
                if int(seq) <= seen:  # a retried task's result that already arrived
                    continue
                seen = int(seq)
                yield pickle.loads(blob)
    except Exception as exc:
        text = str(exc)
        if OOM_HINT in text:
            line = next(ln for ln in text.splitlines() if OOM_HINT in ln)
            raise LakeError(line[line.find("the embedding"):].strip()) from None
        if "WorkerCrashedError" in text or "worker died" in text.lower():
            first = tasks[seen + 1].relpath if seen + 1 < len(tasks) else "?"
            raise LakeError(
                f"a Ray worker died {TASK_RETRIES + 1} times on the same files (a native decoder crash or the "
                f"out-of-memory killer), at or after {first!r}; what was handled is committed. `imgrec ingest` with "
                "--engine local finds and records the file that crashes") from None
        raise
