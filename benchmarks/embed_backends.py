"""Backends for the same embedding weights, side by side: torch (the Embedder as ingestion ran it), ONNX Runtime
(the graph imgrec exports) and, where it is installed (``pip install openvino``), OpenVINO reading the same ONNX
file. ms per image (median of rounds, every backend in turn in each round), cosine to torch, import and load times.
``--micro 0 16`` adds ONNX Runtime running a batch in one run, or in runs of 16 images a thread, beside its default
(runs of ``MICRO_BATCH_PER_THREAD`` images a thread).

    .venv/bin/python benchmarks/embed_backends.py                 # batch 1, 5 and 32, 1 and 2 threads
    .venv/bin/python benchmarks/embed_backends.py --micro 0 1 4   # and ONNX Runtime run otherwise

Real photos of ../shared/data/oxford_flowers17 (exits with a message where it is absent).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def import_ms(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip() or "nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="photos (crops)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--micro", type=int, nargs="*", default=[], metavar="N",
                    help="also ONNX Runtime with runs of N images per thread (0: the whole batch in one run), "
                         "beside the default micro-batch")
    args = ap.parse_args()
    import torch
    from embed_cpu import load_crops

    from imgrec.features.embed import Embedder, spec
    from imgrec.features.runtime import OnnxEmbedder, ensure_onnx

    s = spec("efficientnet-lite0")
    crops = load_crops(args.n, s.name)
    ref = Embedder(s.name, "cpu")
    loads: dict[str, float] = {}
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for t in args.threads:
        def torch_fn(b: np.ndarray, t: int = t) -> np.ndarray:
            torch.set_num_threads(t)
            return ref.embed(b)[0]
        fns[f"torch, {t} thread(s)"] = torch_fn
        t0 = time.perf_counter()
        ort = OnnxEmbedder(s.name, threads=t)
        loads[f"onnxruntime session ({t} thread(s))"] = (time.perf_counter() - t0) * 1000
        fns[f"onnxruntime, {t} thread(s)"] = lambda b, e=ort: e.embed(b)[0]
        for m in args.micro:
            other = OnnxEmbedder(s.name, threads=t, micro_batch=m * t if m else 1 << 30)
            fns[f"onnxruntime, {t} thr, runs of {m * t or 'all'}"] = lambda b, e=other: e.embed(b)[0]
    try:
        import openvino as ov

        core = ov.Core()
        for t in args.threads:
            t0 = time.perf_counter()
            req = core.compile_model(str(ensure_onnx(s)), "CPU", {"INFERENCE_NUM_THREADS": t,
                                                                   "INFERENCE_PRECISION_HINT": "f32"}
                                     ).create_infer_request()
            loads[f"openvino compile ({t} thread(s))"] = (time.perf_counter() - t0) * 1000
            fns[f"openvino, {t} thread(s)"] = lambda b, r=req: r.infer({0: b})[0]
    except ImportError:
        print("openvino is not installed: left out")
    expected = ref.embed(crops)[0]
    for name, fn in fns.items():
        out = np.concatenate([fn(crops[i:i + 32]) for i in range(0, len(crops), 32)])
        cos = (out * expected).sum(1) / np.linalg.norm(out, axis=1)
        print(f"{name:34s} cosine to torch: min {cos.min():.7f}")
    for batch in (1, 5, 32):
        times: dict[str, list[float]] = {n: [] for n in fns}
        for r in range(args.rounds):
            for name, fn in fns.items():
                b = crops[:batch] if batch > 1 else crops[r % len(crops):r % len(crops) + 1]
                t0 = time.perf_counter()
                fn(b)
                times[name].append((time.perf_counter() - t0) * 1000 / len(b))
        for name, v in times.items():
            print(f"batch {batch:2d}  {name:34s} {statistics.median(v[1:]):6.2f} ms/image")
    for module in ("torch", "onnxruntime", "openvino"):
        print(f"import {module}: {import_ms(module):.0f} ms (a new process)")
    for name, ms in loads.items():
        print(f"{name}: {ms:.0f} ms")


if __name__ == "__main__":
    main()
