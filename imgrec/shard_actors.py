"""Shards served by Ray actors on a cluster's nodes: ``imgrec serve-shards --address ADDR`` (or the first engine
that asks, ``Config.shard_address``) starts one detached actor per shard of the lake's current index, spread over the
nodes; each holds its shard's graphs memory-mapped and answers ``knn``. The actors of older snapshots are stopped
when a newer one is served. ``RayShards`` is the ``Searcher`` backend
that fans a search out to them and merges the answers, as ``ShardedGraphs`` does with threads in one process.

- A shard that does not answer within ``Config.shard_timeout_s`` (or whose actor is gone) is left out of that
  search, and the response names it (``SearchResponse.missing``): never a silent partial result.
- A node lost: Ray restarts its actors on the nodes left (``max_restarts=-1``); a restarted actor loads its shard
  again (the lake's folder, which every node must see, or ``s3://``: downloaded to the node's cache), and the
  searches in flight are retried on it.
- The per-row features and the metadata stay with the searching process (the engine's memory-mapped index).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec.lake import Lake, LakeError
from imgrec.searchers import GRAPHS, Hits, LocalGraphs, merge, per_shard, report_missing

NAMESPACE = "imgrec"
SERVED = "served"  # an S3 lake's shards, downloaded by the actors, under the node's cache of the lake's indexes
FAULT_DELAY_ENV = "IMGREC_FAULT_SHARD_DELAY"  # tests: "shard-002:30" makes that shard's actor answer 30 s late


def lake_key(lake: Lake) -> str:
    return hashlib.blake2b(lake.url.encode(), digest_size=6).hexdigest()


def actor_name(lake: Lake, snap: str, shard: str) -> str:
    """The actor serving ``shard`` of the index ``snap`` (``snap-NNNNNNNN``) of ``lake``."""
    return f"{lake_key(lake)}/{snap}/{shard}"


def shard_dir(lake: Lake, snap: str, shard: str) -> Path:
    """The local folder of one shard: in the lake's indexes; for an S3 lake, downloaded once into this node's
    cache (``download_folder``)."""
    from imgrec.index import COMPLETE, INDEXES, download_folder, index_root

    if not lake.remote:
        path = index_root(lake) / snap / shard
        if not path.is_dir():
            raise LakeError(f"{path} is absent: the shard's folder must be visible on every node (or use s3://)")
        return path
    local = index_root(lake) / SERVED / snap / shard
    if (local / COMPLETE).is_file():
        return local
    prefix = f"{INDEXES}/{snap}/{shard}/"
    entries = [e for e in lake.store.list(f"{INDEXES}/{snap}/{shard}") if e.path.startswith(prefix)]
    if not entries:
        raise LakeError(f"{lake.url}: {prefix} holds no files")
    return download_folder(lake, prefix, [e.path for e in entries], local)


class ShardServer:
    """A Ray actor: one shard's graphs, open and warm, searched on request."""

    def __init__(self, lake_url: str, snap: str, shard: str) -> None:
        import ray

        t = time.perf_counter()
        self.shard, self.snap = shard, snap
        self.graphs = LocalGraphs(shard_dir(Lake(lake_url), snap, shard))
        for g in GRAPHS:
            if self.graphs.has(g):
                self.graphs.warm(g)
        fault = os.environ.get(FAULT_DELAY_ENV, "")
        self.delay_s = float(fault.split(":")[1]) if fault.split(":")[0] == shard else 0.0
        ctx = ray.get_runtime_context()
        self.where = {"shard": shard, "snapshot": snap, "node": ctx.get_node_id(), "pid": os.getpid(),
                      "load_s": round(time.perf_counter() - t, 3)}

    def knn(self, graph: str, X: NDArray[np.float32], count: int, ef: int, threads: int
            ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        if self.delay_s:
            time.sleep(self.delay_s)
        h = self.graphs.knn(graph, X, count, ef, threads)
        return h.keys, h.distances

    def info(self) -> dict[str, Any]:
        return {**self.where, "images": {g: self.graphs.count(g) for g in GRAPHS if self.graphs.has(g)}}


def connect(address: str) -> Any:
    """Ray, connected to the cluster at ``address`` (a process already connected is used as it is)."""
    from imgrec.raycluster import connect as ray_connect

    return ray_connect(address)[0]


def _spec(index_path: Path) -> dict[str, Any]:
    import json

    from imgrec.searchers import SHARDS_FILE

    f = index_path / SHARDS_FILE
    if not f.is_file():
        raise LakeError(f"the index {index_path.name} has one shard: build shards first (imgrec index --shards N)")
    return json.loads(f.read_text())


def ensure_actors(lake: Lake, index_path: Path, *, wait_s: float = 300.0) -> list[Any]:
    """The actors serving the index ``index_path``'s shards, started (detached, spread over the nodes) where
    absent, each once its shard is loaded. Ray must be connected (``connect``)."""
    import ray

    from imgrec.raycluster import driver_env

    spec, snap = _spec(index_path), index_path.name
    cls = ray.remote(ShardServer)
    actors = []
    for s in spec["shards"]:
        actors.append(cls.options(
            name=actor_name(lake, snap, s["name"]), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, num_cpus=0, scheduling_strategy="SPREAD",
            runtime_env=driver_env()).remote(lake.url, snap, s["name"]))
    try:
        ray.get([a.info.remote() for a in actors], timeout=wait_s)
    except ray.exceptions.RayActorError as exc:
        raise LakeError(f"a shard server could not load its shard: {exc}") from None
    return actors


def served(lake: Lake) -> list[str]:
    """Names of the actors serving shards of ``lake`` (any snapshot)."""
    from ray.util import list_named_actors

    key = lake_key(lake) + "/"
    return sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(key))


def stop(lake: Lake, older_than: str | None = None) -> list[str]:
    """Stop the actors serving ``lake``'s shards: all, or those of snapshots older than ``older_than``."""
    import ray

    gone = []
    for name in served(lake):
        if older_than is not None and name.split("/")[1] >= older_than:  # snap-NNNNNNNN: in the snapshots' order
            continue
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            gone.append(name)
    return gone


def serve(lake: Lake, address: str) -> dict[str, Any]:
    """``imgrec serve-shards``: the current index's shards served on the cluster at ``address`` (older snapshots'
    actors stopped); where each shard is."""
    from imgrec.index import current_dir

    ray = connect(address)
    path = current_dir(lake)
    if path is None:
        raise LakeError(f"{lake.url} has no index yet: imgrec index --lake {lake.url} --shards N")
    t = time.perf_counter()
    actors = ensure_actors(lake, path)
    infos = ray.get([a.info.remote() for a in actors])
    return {"snapshot": path.name, "address": address, "shards": infos, "stopped": stop(lake, older_than=path.name),
            "seconds": round(time.perf_counter() - t, 3)}


@dataclass
class RayShards:
    """The ``Searcher`` of an index whose shards are served by Ray actors (``ensure_actors``)."""

    lake: Lake
    path: Path  # the index folder (shards.json; the engine's own copy of the per-row features)
    address: str
    timeout_s: float = 10.0
    full: bool = False
    spec: dict[str, Any] = field(default_factory=dict)
    _actors: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        connect(self.address)
        self.spec = _spec(self.path)
        self._actors = ensure_actors(self.lake, self.path)
        stop(self.lake, older_than=self.path.name)  # the index they served is gone, or going

    @property
    def shards(self) -> int:
        return len(self._actors)

    def has(self, graph: str) -> bool:
        return all((self.path / s["name"] / f"{graph}.usearch").is_file() for s in self.spec["shards"])

    def warm(self, graph: str) -> None:
        """The actors hold their graphs open from the start."""

    def count(self, graph: str) -> int:
        return int(sum(s["images"] for s in self.spec["shards"]))

    def knn(self, graph: str, X: NDArray[np.float32], count: int, ef: int, threads: int) -> Hits:
        import ray

        c, e = (count, ef) if self.full else per_shard(count, ef, self.shards)
        X = np.ascontiguousarray(X, dtype=np.float32)
        refs = [a.knn.remote(graph, X, c, e, max(threads, 1)) for a in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        done = set(ready)
        parts, missing, total = [], [], max(self.count(graph), 1)
        for s, ref in zip(self.spec["shards"], refs, strict=True):
            part = f"{s['name']} ({s['images']:,} images, {100 * s['images'] / total:.0f}% of the collection)"
            if ref not in done:
                missing.append(f"{part}: no answer within {self.timeout_s:g} s")
                continue
            try:
                parts.append(Hits(*ray.get(ref)))
            except ray.exceptions.RayError as exc:
                missing.append(f"{part}: its server failed ({type(exc).__name__})")
        if missing:
            report_missing(missing)
        if not parts:
            return Hits(np.full((len(X), count), -1, np.int64), np.full((len(X), count), np.inf, np.float32))
        return merge(parts, count)
