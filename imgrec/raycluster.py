"""Ray, connected: what both sides need of a Ray cluster (ingestion on Ray Data in ``pipelines.distributed``, shards
served by actors in ``imgrec.shard_actors``): the connection, and the environment its workers get from the driver.
``ray`` is imported only when a connection is asked for."""

from __future__ import annotations

import logging
import os
from typing import Any

from imgrec.lake import LakeError

ENV_PREFIXES = ("AWS_", "IMGREC_", "HF_HUB_OFFLINE")  # what the workers need of the driver's environment


def driver_env() -> dict[str, str] | None:
    """The ``runtime_env`` that gives Ray's workers (and actors) the driver's S3 and imgrec settings."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    return {"env_vars": env} if env else None


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at ``address``, or (None) to a private instance on 127.0.0.1 started here;
    a process already connected is used as it is. (ray, whether this call started an instance)."""
    try:
        import ray
    except ImportError:
        raise LakeError("Ray is not installed (--engine ray and served shards need it): "
                        "pip install 'imgrec[ray]' (or pip install 'ray[data]')") from None
    if ray.is_initialized():
        return ray, False
    common: dict[str, Any] = {"runtime_env": driver_env(), "log_to_driver": False, "logging_level": logging.ERROR,
                              "configure_logging": True}
    if address:
        _reachable(address)  # ray.init retries an unreachable address for minutes
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LakeError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        return ray, False
    # a private instance: this machine's cores, loopback only, no dashboard, a bounded object store
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=_store_bytes(), **common)
    return ray, True


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """LakeError unless ``HOST:PORT`` accepts a connection (``auto`` and other forms: left to Ray)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise LakeError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (is `ray start --head` "
                        "running there, with that port open?)") from None


def _store_bytes() -> int:
    """The local instance's object store: a tenth of the memory, between 256 MB and 4 GB (Ray's default, 30%, is
    more than compressed files and crops in flight need)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 1024**3
    return int(min(4 * 1024**3, max(256 * 1024**2, total // 10)))
