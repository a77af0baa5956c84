"""Background jobs for the app: ``imgrec ingest FOLDER --lake LAKE --progress-json`` (and ``imgrec join ...
--progress-json``: ``start_join``) as a subprocess.

A subprocess, not a thread: the app process has torch loaded and serves every session, and ingestion forks worker
processes and installs signal handlers. At most one job per lake runs at a time. Jobs live in a module-level
registry guarded by a lock, so they outlive page switches and sessions, and every session of the process sees the
same job (its progress, its outcome) until a new one starts or someone dismisses it.

Progress comes from the JSON lines the command prints on stdout (done, total, images/s, elapsed); its stderr keeps
the last lines of the log and gives the error of a failed run (``imgrec: error: ...``). ``stop()`` sends SIGINT:
ingestion finishes the image in hand, commits and exits with 130; a later run resumes from there. A second
``stop()`` sends SIGTERM, which stops at once at the last commit.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgrec.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAP_MAX = 50_000  # an ingestion started from the app makes the Explorer's map at its end up to this many images
RUNNING = ("starting", "running", "stopping")
_ids = itertools.count(1)


class JobError(ValueError):
    """A job that cannot start: not a folder, one already running for this lake, ..."""


@dataclass(frozen=True)
class JobState:
    """A consistent view of a job at one moment (what a page draws)."""

    id: int
    lake: str
    folder: str
    status: str  # starting, running, stopping, done, stopped, failed
    done: int = 0
    total: int | None = None  # files to process, once the folder is scanned
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    message: str = ""  # the last log line
    phase: str = "ingest"  # "ingest", then "map" while the Explorer's map is made
    error: str | None = None
    report: dict[str, Any] | None = None
    returncode: int | None = None
    log: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @property
    def fraction(self) -> float:
        """Share of the files processed, 0..1 (0 before the scan is done, 1 once finished)."""
        if not self.running and self.status == "done":
            return 1.0
        if not self.total:
            return 0.0
        return min(1.0, self.done / self.total)


@dataclass
class Job:
    """One ``imgrec ingest`` subprocess and what it reported so far (use :meth:`state` to read it)."""

    lake: str
    folder: str
    argv: list[str]
    kind: str = "ingestion"  # or "join"
    id: int = field(default_factory=lambda: next(_ids))
    started_at: float = field(default_factory=time.monotonic)
    status: str = "starting"
    done: int = 0
    total: int | None = None
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    message: str = "starting…"
    phase: str = "ingest"
    error: str | None = None
    report: dict[str, Any] | None = None
    returncode: int | None = None
    finished_at: float | None = None
    _log: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _proc: subprocess.Popen[str] | None = None
    _finished: threading.Event = field(default_factory=threading.Event)

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True, bufsize=1, env=env, cwd=str(PROJECT_ROOT))
        err = threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True,
                               name=f"imgrec-job-{self.id}-stderr")
        err.start()
        threading.Thread(target=self._read_stdout, args=(self._proc.stdout, err), daemon=True,
                         name=f"imgrec-job-{self.id}-stdout").start()

    def _read_stdout(self, stream: IO[str], stderr_reader: threading.Thread) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                with self._lock:
                    self._log.append(line.rstrip())
                continue
            with self._lock:
                kind = event.get("event")
                if kind == "progress":
                    self.done, self.total = int(event.get("done", 0)), int(event.get("total", 0))
                    self.images_per_s = float(event.get("images_per_s", 0.0))
                    self.elapsed_s = float(event.get("elapsed_s", 0.0))
                    if self.status == "starting":
                        self.status = "running"
                elif kind == "log":
                    self.message = str(event.get("message", "")).removeprefix("imgrec: ")
                    if self.status == "starting":
                        self.status = "running"
                elif kind == "phase":
                    self.phase = str(event.get("phase", self.phase))
                elif kind == "report":
                    self.report = {k: v for k, v in event.items() if k != "event"}
        assert self._proc is not None
        rc = self._proc.wait()
        stderr_reader.join(timeout=5)
        with self._lock:
            self.returncode = rc
            self.finished_at = time.monotonic()
            self.elapsed_s = self.finished_at - self.started_at  # wall time: start-up and index build included
            if rc == 0:
                self.status = "done"
            elif rc in (130, -signal.SIGINT, -signal.SIGTERM) and self.status == "stopping":
                self.status = "stopped"
            elif rc == 130:  # interrupted from outside the app (the server's Ctrl-C reaches its children too)
                self.status = "stopped"
            else:
                self.status = "failed"
                self.error = self.error or self._failure(rc)
        self._finished.set()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.rstrip()
            if not line:
                continue
            with self._lock:
                self._log.append(line)
                if line.startswith("imgrec: error:"):
                    self.error = line.removeprefix("imgrec: error:").strip()

    def _failure(self, rc: int) -> str:
        tail = [x for x in self._log if x.strip()]
        if rc < 0:
            return f"the {self.kind} was killed by signal {-rc}" + (f": {tail[-1]}" if tail else "")
        return f"the {self.kind} failed (exit code {rc})" + (f": {tail[-1]}" if tail else "")

    # --- reading and control ---------------------------------------------------------------------------------------

    def state(self) -> JobState:
        with self._lock:
            elapsed = self.elapsed_s
            if self.status in RUNNING:
                elapsed = time.monotonic() - self.started_at
            return JobState(self.id, self.lake, self.folder, self.status, self.done, self.total, self.images_per_s,
                            round(elapsed, 1), self.message, self.phase, self.error, self.report,
                            self.returncode, tuple(self._log))

    @property
    def running(self) -> bool:
        return not self._finished.is_set()

    def stop(self) -> bool:
        """Ask the run to stop (SIGINT: commit and exit); a second call stops at once (SIGTERM). False if over."""
        with self._lock:
            if self._finished.is_set() or self._proc is None or self._proc.poll() is not None:
                return False
            sig = signal.SIGTERM if self.status == "stopping" else signal.SIGINT
            self.status = "stopping"
            self.message = "stopping after the image in hand, then committing…"
        try:
            self._proc.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the job is over (or ``timeout`` seconds); returns its state."""
        self._finished.wait(timeout)
        return self.state()


# --- the registry: one job per lake, shared by every session of the process ----------------------------------------

_JOBS: dict[str, Job] = {}
_LOCK = threading.Lock()


def build_index(config: Config) -> None:
    """The index of the lake's current snapshot, built by a job in a child process (``python -m pipelines.index``,
    the config passed whole) and waited for: what an engine does with a stale index, the offline pipelines never
    imported by the query path. LakeError with the job's last line if it fails."""
    from imgrec.lake import LakeError

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", ""))
                                                      if p)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.index"], input=config.to_json(), text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(PROJECT_ROOT))
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1].removeprefix("imgrec: error: ") if lines else f"exit status {proc.returncode}"
        raise LakeError(f"building the index failed: {last}")


def _key(lake: str | os.PathLike[str]) -> str:
    from imgrec.config import resolve_lake

    return str(resolve_lake(lake))


def command(folder: str, lake: str, workers: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The argv of the ingestion subprocess: a new lake searchable while it fills, the Explorer's map at the end."""
    argv = [sys.executable, "-m", "imgrec.cli", "ingest", folder, "--lake", lake, "--progress-json", "--quiet",
            "--searchable-early", "--map", "--map-max", str(MAP_MAX)]
    if workers:
        argv += ["--workers", str(int(workers))]
    return argv + list(extra)


def start(folder: str | os.PathLike[str], lake: str | os.PathLike[str], *, workers: int | None = None,
          extra: Sequence[str] = ()) -> Job:
    """Start ingesting ``folder`` into ``lake`` in the background; JobError if it cannot start."""
    text = os.fspath(folder).strip() if folder is not None else ""
    if not text:
        raise JobError("give the path of a folder of images to ingest")
    if text.startswith("s3://"):  # a prefix of object storage: the ingestion lists it (and says what is wrong)
        path: Path | str = text.rstrip("/")
    else:
        path = Path(os.path.abspath(Path(text).expanduser()))
        if not path.exists():
            raise JobError(f"{path} does not exist (a folder on the machine that runs the app)")
        if not path.is_dir():
            raise JobError(f"{path} is not a folder: give the folder that holds the images")
        if not os.access(path, os.R_OK | os.X_OK):
            raise JobError(f"{path} cannot be read (permission denied)")
    key = _key(lake)
    if not key.startswith("s3://") and Path(key).exists() and not Path(key).is_dir():
        raise JobError(f"the lake {key} is a file, not a folder: choose another lake folder")
    with _LOCK:
        current = _JOBS.get(key)
        if current is not None and current.running:
            raise JobError(f"an ingestion into {key} is already running (folder {current.folder}); wait for it to "
                           "finish or stop it first")
        job = Job(key, str(path), command(str(path), key, workers, extra))
        try:
            job._spawn()
        except OSError as exc:
            raise JobError(f"cannot start the ingestion: {exc}") from None
        _JOBS[key] = job
    return job


def join_output(lake: str | os.PathLike[str], left: str, right: str, measure: str, k: int | None,
                threshold: float | None) -> Path:
    """Where the app keeps a join's pairs: imgrec's cache folder (never the lake: a viewer may join too)."""
    import hashlib

    from imgrec.config import cache_dir

    key = _key(lake)
    name = hashlib.blake2b(repr((left, right, measure, k, threshold)).encode(), digest_size=8).hexdigest()
    return cache_dir() / "joins" / hashlib.blake2b(key.encode(), digest_size=8).hexdigest() / f"{name}.parquet"


def start_join(lake: str | os.PathLike[str], left: str, right: str, measure: str, *, k: int | None = None,
               threshold: float | None = None) -> Job:
    """Run ``imgrec join`` in the background, its pairs into ``join_output(...)``; one join per lake at a time."""
    key = _key(lake)
    out = join_output(key, left, right, measure, k, threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "imgrec.cli", "join", left, right, "--lake", key, "--measure", measure,
            "--out", str(out), "--progress-json", "--quiet"]
    argv += ["--k", str(int(k))] if k is not None else ["--threshold", repr(float(threshold or 0.0))]
    with _LOCK:
        current = _JOBS.get("join:" + key)
        if current is not None and current.running:
            raise JobError("a join of this lake is already running; wait for it to finish or stop it first")
        job = Job(key, f"{left} ~ {right}", argv, kind="join")
        try:
            job._spawn()
        except OSError as exc:
            raise JobError(f"cannot start the join: {exc}") from None
        _JOBS["join:" + key] = job
    return job


def _slot(lake: str | os.PathLike[str], kind: str) -> str:
    return ("join:" if kind == "join" else "") + _key(lake)


def current(lake: str | os.PathLike[str], kind: str = "ingestion") -> Job | None:
    """The running or last job of ``lake`` in this process (None if none, or dismissed)."""
    with _LOCK:
        return _JOBS.get(_slot(lake, kind))


def stop(lake: str | os.PathLike[str], kind: str = "ingestion") -> bool:
    job = current(lake, kind)
    return job.stop() if job is not None else False


def dismiss(lake: str | os.PathLike[str], kind: str = "ingestion") -> None:
    """Forget the finished job of ``lake`` (a running one is kept)."""
    with _LOCK:
        job = _JOBS.get(_slot(lake, kind))
        if job is not None and not job.running:
            del _JOBS[_slot(lake, kind)]


def all_jobs() -> list[Job]:
    with _LOCK:
        return list(_JOBS.values())
