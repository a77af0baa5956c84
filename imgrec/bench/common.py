"""Shared pieces of the benchmark: percentiles, the process's memory, cache folders, and child processes that hand
back one JSON line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MARK = "IMGREC_BENCH "  # prefix of a child's result line on stdout
REPO = Path(__file__).resolve().parents[2]
Log = Callable[[str], None]


class BenchError(RuntimeError):
    """A benchmark step failed (a child process's error is in the message)."""


def default_work() -> Path:
    """Where synthetic lakes and the default source lake are cached: ``$IMGREC_BENCH_CACHE``, else ``bench`` in
    imgrec's cache folder (``~/.cache/imgrec/bench``)."""
    from imgrec.config import cache_dir

    return Path(os.environ.get("IMGREC_BENCH_CACHE") or cache_dir() / "bench")


def stats(values: Sequence[float]) -> dict[str, float]:
    """count, p50, p95, mean, min and max (ms or whatever the values are), rounded; NaN for no values."""
    if not values:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "mean": math.nan, "min": math.nan, "max": math.nan}
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "p50": _r(np.percentile(a, 50)), "p95": _r(np.percentile(a, 95)),
            "mean": _r(a.mean()), "min": _r(a.min()), "max": _r(a.max())}


def _r(x: float) -> float:
    return round(float(x), 3 if abs(x) < 100 else 1)


def memory() -> dict[str, float]:
    """This process's resident memory in MB from ``/proc/self/status``: rss (VmRSS), peak (VmHWM), anon (RssAnon:
    heap, arrays) and file (RssFile: memory-mapped files such as the index, and shared libraries)."""
    out: dict[str, float] = {}
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in keys:
                    out[keys[name]] = round(int(value.split()[0]) / 1024.0, 1)
    except OSError:  # not Linux: peak RSS from getrusage only
        import resource

        out["peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def digest(*parts: Any) -> str:
    """A short stable key of JSON-able parts (cache names)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (rename: a half-made cache never has the final name)."""
    if final.exists():  # made meanwhile by another run: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, final)


def tmp_dir_for(final: Path) -> Path:
    """A fresh temporary sibling of ``final`` (stale ones of dead runs are removed first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(final.name + ".tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


T0_ENV = "IMGREC_BENCH_T0"  # the run's start (time.time()), so that children's log lines share the parent's clock


def make_logger(enabled: bool = True) -> Log:
    """Progress lines on stderr, stamped with the seconds since the run started."""
    t0 = float(os.environ.get(T0_ENV) or time.time())
    os.environ.setdefault(T0_ENV, repr(t0))

    def log(message: str) -> None:
        if enabled:
            print(f"[bench {time.time() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TQDM_DISABLE", "1")
    return env


def run_child(module: str, args: Sequence[str], *, timeout: float, quiet: bool = False) -> dict[str, Any]:
    """Run ``python -m <module> args`` in a fresh interpreter; its result is the last ``MARK`` line of stdout.

    The child's stderr (its progress lines) goes to ours unless ``quiet``.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True,
                              timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise BenchError(f"{module} ran past its limit of {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = ((proc.stderr or "") + proc.stdout).strip()[-2000:]
        raise BenchError(f"{module} exited with code {proc.returncode} and no result{': ' + tail if tail else ''}")
    out = json.loads(lines[-1][len(MARK):])
    if isinstance(out, dict) and out.get("error"):
        raise BenchError(f"{module}: {out['error']}")
    return out


def emit(result: dict[str, Any]) -> None:
    """A child's result: one line on stdout."""
    print(MARK + json.dumps(result, default=_json_default), flush=True)


def child_main(fn: Callable[[], dict[str, Any]]) -> int:
    """Run a child's work and emit its result, or its error as ``{"error": ...}``."""
    try:
        emit(fn())
    except Exception as exc:  # reported by the parent, which carries on with the next step
        import traceback

        traceback.print_exc(file=sys.stderr)
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def index_fingerprint() -> str:
    """What an index built by this code depends on: the index and similarity code and the default settings.

    A cached synthetic lake whose index was built by other code gets its index rebuilt (and timed) again.
    """
    from dataclasses import asdict

    from imgrec.config import Config

    files = [REPO / "pipelines" / "index.py", REPO / "imgrec" / "index.py", REPO / "imgrec" / "similarity.py"]
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes() if f.is_file() else b"")
    cfg = {k: v for k, v in asdict(Config.load("/")).items() if k != "lake"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]
