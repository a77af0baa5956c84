"""Worker processes that survive their own deaths: an ordered map of chunks of work over processes, where a worker
killed mid-chunk (a segfault in a native decoder, the out-of-memory killer, ``kill -9``) or stuck past its time
limit is replaced, and the items it held are tried again one by one; an item that kills its worker when alone too
becomes a "crashed" result for its caller to record. ``multiprocessing.Pool`` loses such a task and waits forever.

Each worker gets its chunks through a pipe of its own, so the pool knows what every worker holds; results come
back in the order of the chunks, and at most ``window`` chunks are ahead of the one the caller waits for (bounded
memory, whatever the speed of the consumer).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

Item = Any
Result = Any


@dataclass
class _Job:
    index: int  # the chunk's position in the input
    items: list[Item]
    pos: int | None = None  # an item of a split chunk: its position in the chunk
    of: int = 0  # ... and the chunk's length
    attempt: int = 0  # 0: as given; 1: alone, after its chunk's worker died


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    held: deque[_Job] = field(default_factory=deque)
    since: float = 0.0  # when it started the job at the head of ``held``
    timed_out: bool = False


def _serve(conn: Connection, initializer: Callable[..., None] | None, initargs: tuple[Any, ...],
           fn: Callable[[list[Item]], list[Result]]) -> None:
    """A worker's life: Ctrl-C is the parent's to handle; SIGTERM ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, items = msg
        conn.send((index, fn(items)))


def crash_reason(exitcode: int | None, timed_out: bool, limit_s: float) -> str:
    """Why a worker died, in words for the record of the file it held."""
    if timed_out:
        return f"the decoder took more than {limit_s:.0f} s (its worker process was stopped)"
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", e.g. by the out-of-memory killer" if name == "SIGKILL" else ""
        return f"the decoder crashed (its worker process was killed by {name}{hint})"
    return f"the decoder crashed (its worker process exited with code {exitcode})"


class WorkerPool:
    """``map(chunks)`` over ``size`` processes (forked, or ``start_method``), results in order; see the module's
    docstring.

    ``fn(items) -> results`` (one per item) runs in the workers after ``initializer(*initargs)``;
    ``on_crash(item, reason) -> result`` stands for an item that killed its worker twice. ``item_timeout_s``: a
    worker holding a chunk longer than this per item is stopped (and the chunk's items retried alone).
    """

    def __init__(self, size: int, fn: Callable[[list[Item]], list[Result]],
                 on_crash: Callable[[Item, str], Result], *, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = (), per_worker: int = 2, window: int | None = None,
                 item_timeout_s: float = 300.0, start_method: str = "fork") -> None:
        self.ctx = mp.get_context(start_method)  # spawn: from a process with threads of its own (a Ray actor)
        self.fn, self.on_crash, self.initializer, self.initargs = fn, on_crash, initializer, initargs
        self.per_worker, self.item_timeout_s = max(1, per_worker), item_timeout_s
        self.window = window or 4 * size * self.per_worker
        self.workers: list[_Worker] = [self._start() for _ in range(max(1, size))]
        self.restarts = 0  # workers replaced after dying
        self.crashed = 0  # items given up on
        self.received = 0  # items whose results are back (in any order)
        self.done = False  # every chunk handed back

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(child, self.initializer, self.initargs, self.fn), daemon=True,
                                name="imgrec-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def map(self, chunks: Iterable[list[Item]]) -> Iterator[list[Result]]:
        source = iter(enumerate(chunks))
        queue: deque[_Job] = deque()
        exhausted = False
        ready: dict[int, list[Result]] = {}
        parts: dict[int, list[Result | None]] = {}  # split chunks: the results of their items so far
        next_out = 0
        while True:
            while next_out in ready:  # hand back what is next in order
                yield ready.pop(next_out)
                next_out += 1
            while not exhausted and len(queue) < len(self.workers) * self.per_worker:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                queue.append(_Job(nxt[0], list(nxt[1])))
            if exhausted and not queue and not any(w.held for w in self.workers) and not ready and not parts:
                self.done = True
                return
            self._dispatch(queue, next_out)
            for job, results in self._collect(queue):
                if job.pos is None:
                    ready[job.index] = results
                    continue
                got = parts.setdefault(job.index, [None] * job.of)
                got[job.pos] = results[0]
                if all(r is not None for r in got):
                    ready[job.index] = parts.pop(job.index)  # type: ignore[assignment]

    def _dispatch(self, queue: deque[_Job], next_out: int) -> None:
        now = time.monotonic()
        while queue and queue[0].index - next_out < self.window:
            worker = min(self.workers, key=lambda w: len(w.held))
            if len(worker.held) >= self.per_worker:
                return
            job = queue.popleft()
            if not worker.held:
                worker.since = now
            worker.held.append(job)
            try:
                worker.conn.send((job.index, job.items))
            except OSError:  # it died since the last look (its pipe is broken): ``_collect`` sees the death and
                return  # hands its jobs, this one too, to a replacement

    def _collect(self, queue: deque[_Job]) -> list[tuple[_Job, list[Result]]]:
        """Wait for results (or a death); returns the jobs finished, requeues or gives up those of dead workers."""
        busy = [w for w in self.workers if w.held]
        if not busy:
            return []
        deadline = min(w.since + self.item_timeout_s * len(w.held[0].items) for w in busy)
        timeout = max(0.0, min(deadline - time.monotonic(), 1.0))
        ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout))
        out: list[tuple[_Job, list[Result]]] = []
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if not w.held:
                continue
            dead = w.proc.sentinel in ready
            try:
                while w.held and w.conn.poll():  # results first: a worker may have answered, then died
                    index, results = w.conn.recv()
                    job = w.held.popleft()
                    assert job.index == index, (job.index, index)
                    out.append((job, results))
                    self.received += len(results)
                    w.since = now
            except (EOFError, OSError):
                dead = True  # died mid-send
            if not w.held and not dead:
                continue
            if not dead and now - w.since > self.item_timeout_s * len(w.held[0].items):
                w.timed_out = dead = True
                w.proc.kill()
            if not dead:
                continue
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            reason = crash_reason(w.proc.exitcode, w.timed_out, self.item_timeout_s)
            out += self._requeue(w.held, queue, reason)
            w.conn.close()
            self.workers[i] = self._start()
            self.restarts += 1
        return out

    def _requeue(self, held: deque[_Job], queue: deque[_Job], reason: str) -> list[tuple[_Job, list[Result]]]:
        """The jobs of a dead worker. The one it was working on (the first: a worker takes its jobs in turn) has
        each item tried alone once more, or, when it was already alone on a second try, becomes its crash result;
        the jobs behind it were not started and go back as they were. All at the front of the queue."""
        head, *rest = held
        given_up: list[tuple[_Job, list[Result]]] = []
        retry: list[_Job] = []
        if head.attempt >= 1:
            self.crashed += 1
            self.received += 1
            given_up.append((head, [self.on_crash(head.items[0], reason)]))
        else:
            retry += [_Job(head.index, [item], pos, len(head.items), 1) for pos, item in enumerate(head.items)]
        queue.extendleft(reversed(retry + rest))
        return given_up

    def close(self) -> None:
        """Stop every worker (a running chunk is abandoned)."""
        for w in self.workers:
            try:
                if w.held:
                    w.proc.terminate()
                else:
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
            w.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
