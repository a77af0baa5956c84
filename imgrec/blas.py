"""numpy's BLAS held to one thread while a search or a join runs (``one_blas_thread``)."""

from __future__ import annotations

import threading
from typing import Any

_BLAS: list[Any] = []
_BLAS_LOCK = threading.Lock()


def one_blas_thread() -> Any:
    """numpy's BLAS (OpenBLAS) on one thread while a search runs: its products are small, and OpenBLAS's idle
    threads spin for a while after each call, taking the cores the model's threads need (5 uploads: the embedding
    took 70-97 ms instead of 54-60). A context manager; a no-op where threadpoolctl finds no BLAS."""
    import contextlib

    with _BLAS_LOCK:
        if not _BLAS:
            try:
                from threadpoolctl import ThreadpoolController

                _BLAS.append(ThreadpoolController())
            except ImportError:
                _BLAS.append(None)
    controller = _BLAS[0]
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()
