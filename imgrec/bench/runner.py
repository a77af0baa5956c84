"""What ``imgrec bench`` runs, in which order and in which process.

1. the source lake of real photos (given, or ingested once and cached);
2. per N: the synthetic lake (cached), its index (``build_indexes``, in a fresh process: build time and peak
   memory), then a fresh process for the search stage, the exact search and the end-to-end uploads (so the resident
   memory is that lake's);
3. cold start on the largest lake; 4. ingestion of real photos with 1 and 2 workers;
5. the report: JSON + Markdown, each figure beside its target.

A step that fails is recorded in the report's ``errors`` and the run goes on with the next one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgrec.bench.common import REPO, T0_ENV, default_work, make_logger, run_child
from imgrec.measures import MEASURES

SECTIONS = ("search", "e2e", "cold", "ingest")
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": (10_000,), "queries1": 20, "queries5": 8, "e2e1": 5, "e2e5": 3, "cold_runs": 1,
              "cold_stored": False, "ingest_limit": 400},
    "full": {"sizes": (10_000, 100_000, 400_000, 1_000_000), "queries1": 100, "queries5": 30, "e2e1": 20, "e2e5": 10,
             "cold_runs": 3, "cold_stored": True, "ingest_limit": 2000},
}
LONG = 6 * 3600.0  # a child's time limit: building a 1M lake takes long on 2 cores


@dataclass
class BenchOptions:
    """What to run; ``None`` takes the mode's preset (``PRESETS``)."""

    quick: bool = True
    sizes: Sequence[int] | None = None
    out: Path | None = Path("docs") / "bench"
    source_lake: Path | None = None
    work: Path | None = None
    measures: Sequence[str] = MEASURES
    queries1: int | None = None  # single-image searches per measure
    queries5: int | None = None  # 5-image searches per measure
    e2e1: int | None = None  # end-to-end searches with 1 upload per measure
    e2e5: int | None = None  # ... with 5 uploads
    cold_runs: int | None = None
    cold_stored: bool | None = None  # also a cold start with stored features (no model)
    ingest_limit: int | None = None  # images per ingested set (0: all)
    ingest_workers: Sequence[int] = (1, 2)
    ingest_roots: Sequence[tuple[str, Path]] | None = None  # default: ../shared/data sets, else generated images
    sections: Sequence[str] = SECTIONS
    seed: int = 0
    verbose: bool = True
    stem: str | None = None  # report file names: <stem>.json / .md (default: ``default_stem``)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def get(self, name: str) -> Any:
        value = getattr(self, name)
        return PRESETS[self.mode][name] if value is None else value


def machine() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    from importlib import metadata

    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "accelerator": "no GPU", "load_start": _load()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = [ln for ln in cpuinfo if ln.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), [])
        info["vector_extensions"] = vector_extensions(flags)
        info["cpu_id"] = cpu_identity(cpuinfo, cache_sizes())
        mem = [ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")]
        info["memory_gb"] = round(int(mem[0].split()[1]) / 1024**2, 1) if mem else None
    except OSError:
        pass
    if Path("/dev/nvidia0").exists():
        info["accelerator"] = "NVIDIA GPU present"
    for pkg in ("numpy", "usearch", "duckdb", "polars", "pyarrow", "torch"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = (head + ("+changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


VECTOR_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
                "avx512_bf16": "AVX-512 BF16", "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_bf16": "AMX BF16",
                "amx_int8": "AMX INT8"}


def vector_extensions(flags: Sequence[str]) -> list[str]:
    """The vector instruction sets among a CPU's flags (/proc/cpuinfo) that decide how fast the model runs: an
    embedding took 2.4x longer on an AVX2-only AMD EPYC than on an Intel Xeon with AVX-512."""
    have = set(flags)
    return [name for flag, name in VECTOR_FLAGS.items() if flag in have]


def cpu_identity(cpuinfo: Sequence[str], caches: dict[str, str]) -> str | None:
    """What tells two CPUs of one name apart (a virtual machine's "AMD EPYC" is an AVX2-only one on one day, one with
    AVX-512 and twice the cache on another): "family 26 model 2, L2 1024K, L3 32768K" (the first core's)."""
    fields = {}
    for ln in cpuinfo:
        key, _, value = ln.partition(":")
        key = key.strip()
        if not key and fields:
            break  # the first core's block only
        if key in ("cpu family", "model") and key not in fields:
            fields[key] = value.strip()
    parts = [f"family {fields['cpu family']} model {fields.get('model', '?')}"] if "cpu family" in fields else []
    parts += [f"{level} {size}" for level, size in caches.items()]
    return ", ".join(parts) or None


def cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, str]:
    """{"L2": "1024K", "L3": "32768K"}: the unified caches of the first core (sysfs), empty where not readable."""
    out = {}
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Unified":
                out[f"L{(index / 'level').read_text().strip()}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return out


def _load() -> float | None:
    """The 1-minute load average (other work sharing the cores)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``opts.out`` unless it is None)."""
    from imgrec.bench.cold import bench_cold
    from imgrec.bench.ingest import bench_ingest
    from imgrec.bench.report import evaluate_targets, write
    from imgrec.bench.source import ingest_sets, photo_files, source_lake

    t_start = time.perf_counter()
    os.environ[T0_ENV] = repr(time.time())  # the children's log lines count from here too
    log = make_logger(opts.verbose)
    work = Path(opts.work or default_work()).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    sections = set(opts.sections)
    sizes = [int(n) for n in opts.get("sizes")]
    report: dict[str, Any] = {
        "mode": opts.mode, "started_at": datetime.now(UTC).isoformat(), "machine": machine(),
        "options": {"sizes": sizes, "measures": list(opts.measures), "sections": sorted(sections),
                    **{k: opts.get(k) for k in ("queries1", "queries5", "e2e1", "e2e5", "cold_runs", "ingest_limit")},
                    "ingest_workers": list(opts.ingest_workers), "seed": opts.seed, "work": str(work)},
        "source": {}, "search": [], "e2e": [], "cold_start": None, "ingestion": [], "notes": [], "errors": [],
    }

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # recorded; the other steps still run
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            report["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"})
            return None

    source = None
    if sections & {"search", "e2e", "cold"}:
        source = step("source", lambda: source_lake(opts.source_lake, work, log))
    if source is not None:
        report["source"] = source.to_json()
        if source.kind == "generated":
            report["notes"].append("../shared/data is absent: the source features come from generated images, not "
                                   "real photos; the figures only show that the machinery works.")
    e2e1, e2e5 = int(opts.get("e2e1")), int(opts.get("e2e5"))
    photos = photo_files(source.lake, max(1, e2e1 + 5 * e2e5), opts.seed) if source else []
    if source is not None and not photos and sections & {"e2e", "cold"}:
        report["notes"].append("the source lake's image files are not at hand: no uploads (end to end skipped, cold "
                               "start with stored features)")
    photos_file = work / f"photos-{os.getpid()}.json"
    photos_file.write_text(json.dumps([str(p) for p in photos]))
    largest: tuple[int, str] | None = None
    try:
        for n in sizes if source is not None else []:
            log(f"N = {n:,}")
            synth = step(f"synthetic lake N={n}", lambda n=n: run_child("imgrec.bench.synth", [
                "make", "--source", source.lake, "--n", n, "--work", work, "--seed", opts.seed], timeout=LONG,
                quiet=not opts.verbose))
            if synth is None:
                continue
            index = step(f"index N={n}", lambda s=synth: run_child(
                "imgrec.bench.synth", ["index", "--lake", s["lake"]], timeout=LONG, quiet=not opts.verbose))
            if index is None:
                continue
            largest = (n, synth["lake"])
            args: list[Any] = ["--lake", synth["lake"], "--measures", ",".join(opts.measures), "--seed", opts.seed,
                               "--queries1", opts.get("queries1") if "search" in sections else 0,
                               "--queries5", opts.get("queries5") if "search" in sections else 0]
            if "e2e" in sections and photos:
                args += ["--photos", photos_file, "--e2e1", e2e1, "--e2e5", e2e5]
            res = step(f"search N={n}", lambda a=args: run_child("imgrec.bench.search", a, timeout=LONG,
                                                                     quiet=not opts.verbose))
            if res is None:
                continue
            e2e, err = res.pop("e2e", None), res.pop("e2e_error", None)
            if err:
                report["errors"].append({"section": f"end to end N={n}", "error": err})
            if "search" in sections:
                report["search"].append({**res, "n": n, "synth": synth, "index": index})
            if e2e:
                report["e2e"].append({"n": n, **e2e})
    finally:
        photos_file.unlink(missing_ok=True)

    if "cold" in sections and largest is not None:
        n, lake = largest
        log(f"cold start on the N={n:,} lake")
        cold = step("cold start", lambda: bench_cold(Path(lake), photos[0] if photos else None,
                                                     int(opts.get("cold_runs")), stored=bool(opts.get("cold_stored")),
                                                     log=log))
        if cold is not None:
            report["cold_start"] = {"n": n, **cold}
    if "ingest" in sections:
        sets = [(name, Path(root), "given") for name, root in opts.ingest_roots] if opts.ingest_roots else \
            step("ingestion sets", lambda: ingest_sets(work, log)) or []
        if any(kind == "generated" for _, _, kind in sets):
            report["notes"].append("ingestion timed on generated images (../shared/data absent)")
        for name, root, _ in sets:
            for w in opts.ingest_workers:
                log(f"ingestion: {name}, {w} worker(s)")
                r = step(f"ingestion {name} {w}", lambda name=name, root=root, w=w: bench_ingest(
                    name, root, w, work, int(opts.get("ingest_limit")), log=log))
                if r is not None:
                    report["ingestion"].append(r)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["machine"]["load_end"] = _load()
    if source is not None and source.built_s:
        report["notes"].append(f"the source lake was ingested in this run ({source.built_s:.0f} s, once: later runs "
                               f"reuse it), so the run took {report['seconds'] - source.built_s:.0f} s without it")
    report["targets"] = evaluate_targets(report)
    if opts.out is not None:
        js, md = write(report, Path(opts.out), opts.stem or default_stem(opts.mode, sizes))
        report["files"] = [str(js), str(md)]
        log(f"report: {js} and {md} ({report['seconds']} s)")
    return report


def default_stem(mode: str, sizes: Sequence[int]) -> str:
    """``bench-quick`` / ``bench-full``; a run of other sizes gets them in its name (``bench-full-100k``), so that
    it does not replace the report of the whole run."""
    if list(sizes) == list(PRESETS[mode]["sizes"]):
        return f"bench-{mode}"
    short = [f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)
             for n in sizes]
    return f"bench-{mode}-{'-'.join(short)}"


def parse_sizes(text: str) -> list[int]:
    """``10000,100k,1M`` -> [10000, 100000, 1000000]."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1].lower(), 1)
        out.append(int(float(part[:-1] if mult > 1 else part) * mult))
    if not out or any(n < 10 for n in out):
        raise ValueError(f"--sizes wants collection sizes of at least 10, such as 10000,100k,1M (got {text!r})")
    return out


def cli(args: Any) -> int:
    """``imgrec bench``: the report's files, and its targets on stdout (or the whole report with --json)."""
    from imgrec.bench.report import markdown

    opts = BenchOptions(
        quick=args.quick, sizes=parse_sizes(args.sizes) if args.sizes else None,
        out=Path(args.out) if args.out else BenchOptions.out, source_lake=Path(args.source_lake)
        if args.source_lake else None, work=Path(args.work) if args.work else None,
        sections=[s for s in SECTIONS if s not in (args.skip or [])], ingest_limit=args.ingest_limit,
        queries1=args.queries, queries5=max(1, args.queries // 3) if args.queries else None,
    )
    report = run(opts)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        text = markdown(report)
        end = text.find("\n## ", text.find("## Targets") + 1) if "## Targets" in text else -1
        print(text[:end] if end > 0 else text)
        print("\n".join(f"written: {f}" for f in report.get("files", [])))
    return 1 if report["errors"] else 0
