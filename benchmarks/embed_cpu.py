"""CPU embedding variants side by side: ms/image (median of repetitions) and cosine with the float32 eager baseline.

Run from the repository root (reads real photos from ../shared/data/oxford_flowers17; exits with a message if absent):

    .venv/bin/python benchmarks/embed_cpu.py                      # every variant, batch 32, torch's default threads
    .venv/bin/python benchmarks/embed_cpu.py --threads 1 --batch 8 16 32 64 --variants eager-nchw frozen-cl

Variants are timed round-robin (one repetition of each, then the next repetition), so a load that comes and goes on a
shared machine hits all of them alike. Every variant embeds the same crops in the same batches; ``cos min`` is the
smallest cosine between its vector and the baseline's for the same image. ``ms/img`` is wall time, ``cpu ms`` the
process's CPU time (all torch threads, spinning included): with --threads 1 the steadier figure on a busy machine.
``1st batch`` is the first call's time (oneDNN set-up, JIT passes, torch.compile's compilation).

Variants (all float32 unless bf16): eager-nchw the model as loaded on contiguous NCHW input (the reference);
eager-permuted the Embedder before this benchmark (NCHW view of the NHWC crops); -cl channels_last weights and
input; foldpad symmetric "same" pads moved into the convs; fused batch norms folded into the convs; inplace ReLU6
in place; slicepad the asymmetric stride-2 pads done by a wider symmetric padding and dropping the first output row
and column; frozen torch.jit.trace + freeze; ofi torch.jit.optimize_for_inference; bf16 autocast to bfloat16;
compile-cl torch.compile (inductor, needs a C++ compiler); embedder the current Embedder.embed (what ingestion runs).
The ``malloc retain`` tables run after embed.retain_freed_memory() (what ingestion does).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "oxford_flowers17"


def load_crops(n: int, model_name: str) -> np.ndarray:
    from imgrec.features.embed import preprocess, spec
    from imgrec.features.extract import decode_side
    from imgrec.imaging import decode

    files = sorted((DATA / "images").glob("*/*.jpg"))
    if not files:
        sys.exit(f"no images under {DATA}/images: the shared data set is absent; nothing to measure")
    step = max(1, len(files) // n)
    s = spec(model_name)
    return np.stack([preprocess(decode(f.read_bytes(), min_side=decode_side(s)).image, s)
                     for f in files[::step][:n]])


def variants(emb: object, names: list[str]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name -> function (B, S, S, 3) uint8 -> (B, dim) float32 unit vectors (the backbone; the head is cheap)."""
    import torch

    from imgrec.features import embed as E

    backbone = E._load(emb.spec)[0].eval()  # type: ignore[attr-defined]  # as loaded, before Embedder's changes
    mean, std = emb._mean, emb._std  # type: ignore[attr-defined]
    crop = emb.spec.crop  # type: ignore[attr-defined]

    def to_x(batch: np.ndarray, cl: bool, permuted: bool = False) -> torch.Tensor:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)
        if permuted:
            return x
        return x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

    def run(model: Callable[[torch.Tensor], torch.Tensor], cl: bool, bf16: bool = False, permuted: bool = False
            ) -> Callable[[np.ndarray], np.ndarray]:
        def f(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                feats = model(to_x(batch, cl, permuted)).float()
            return torch.nn.functional.normalize(feats, dim=1).numpy()
        return f

    def traced(cl: bool, fold_pad: bool = False, ofi: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        net = E._fold_same_padding(_copy(backbone), asymmetric=False) if fold_pad else _copy(backbone)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        example = to_x(np.zeros((2, crop, crop, 3), np.uint8), cl)
        with torch.inference_mode(False), torch.no_grad():
            t = torch.jit.trace(net.eval(), example)
            return torch.jit.optimize_for_inference(t) if ofi else torch.jit.freeze(t)

    def eager_cl() -> Callable[[torch.Tensor], torch.Tensor]:
        return _copy(backbone).to(memory_format=torch.channels_last)

    def folded(cl: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        net = E._fold_same_padding(_copy(backbone), asymmetric=False)
        return net.to(memory_format=torch.channels_last) if cl else net

    def fused(cl: bool) -> Callable[[torch.Tensor], torch.Tensor]:  # padding and batch norms folded, no JIT
        net = E._fold_same_padding(E._fuse_conv_bn(_copy(backbone)), asymmetric=False)
        return net.to(memory_format=torch.channels_last) if cl else net

    def inplace(cl: bool, asymmetric: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:  # ReLU6 in place
        net = E._relu6_inplace(E._fold_same_padding(E._fuse_conv_bn(_copy(backbone)), asymmetric=asymmetric))
        return net.to(memory_format=torch.channels_last) if cl else net

    def compiled() -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(_copy(backbone).to(memory_format=torch.channels_last))

    def current() -> Callable[[np.ndarray], np.ndarray]:  # what imgrec.features.embed.Embedder does (now)
        return lambda batch: emb.embed(batch)[0]  # type: ignore[attr-defined]

    build: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
        "eager-nchw": lambda: run(backbone, False),  # the reference: the model as loaded, contiguous NCHW input
        "eager-permuted": lambda: run(backbone, False, permuted=True),  # the Embedder before: NHWC data, NCHW view
        "eager-cl": lambda: run(eager_cl(), True),
        "eager-foldpad-cl": lambda: run(folded(True), True),
        "fused-nchw": lambda: run(fused(False), False),
        "fused-cl": lambda: run(fused(True), True),
        "fused-inplace-cl": lambda: run(inplace(True), True),
        "fused-inplace-slicepad-cl": lambda: run(inplace(True, asymmetric=True), True),
        "frozen-nchw": lambda: run(traced(False), False),
        "frozen-cl": lambda: run(traced(True), True),
        "frozen-foldpad-cl": lambda: run(traced(True, fold_pad=True), True),
        "ofi-nchw": lambda: run(traced(False, ofi=True), False),
        "ofi-foldpad-cl": lambda: run(traced(True, fold_pad=True, ofi=True), True),
        "bf16-eager-cl": lambda: run(eager_cl(), True, bf16=True),
        "bf16-frozen-cl": lambda: run(_bf16_frozen(backbone, to_x, crop), True),
        "compile-cl": lambda: run(compiled(), True),
        "embedder": current,
    }
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            out[name] = build[name]()
        except Exception as exc:  # a variant this machine cannot build: say so and go on
            print(f"{name:25s} unavailable: {exc.__class__.__name__}: {str(exc)[:200]}")
            continue
        print(f"{name:25s} built in {time.perf_counter() - t0:6.2f}s", flush=True)
    return out


def _copy(module: object) -> object:
    import copy

    return copy.deepcopy(module)


def _bf16_frozen(backbone: object, to_x: Callable, crop: int) -> Callable:
    import torch

    net = _copy(backbone).to(memory_format=torch.channels_last).requires_grad_(False)  # type: ignore[attr-defined]
    example = to_x(np.zeros((2, crop, crop, 3), np.uint8), True)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.jit.freeze(torch.jit.trace(net.eval(), example))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images (crops) per repetition")
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="torch threads (0: torch's default)")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--malloc", choices=["default", "retain", "both"], default="both",
                    help="glibc malloc as is, after embed.retain_freed_memory(), or one table each (default first)")
    ap.add_argument("--variants", nargs="+", default=[
        "eager-permuted", "eager-cl", "eager-foldpad-cl", "fused-cl", "frozen-nchw", "frozen-cl", "frozen-foldpad-cl",
        "ofi-nchw", "ofi-foldpad-cl", "fused-inplace-cl", "fused-inplace-slicepad-cl", "bf16-eager-cl", "bf16-frozen-cl", "embedder"])
    args = ap.parse_args()

    import torch

    from imgrec.features.embed import Embedder, retain_freed_memory

    crops = load_crops(args.n, args.model)
    emb = Embedder(args.model, "cpu")
    fns = variants(emb, list(dict.fromkeys(["eager-nchw", *args.variants])))
    print(f"{len(crops)} crops {crops.shape[1:]}, torch {torch.__version__}, "
          f"default threads {torch.get_num_threads()}, reps {args.reps}")
    default_threads = torch.get_num_threads()
    first: dict[str, float] = {}  # seconds of each variant's very first batch (compilation, one-off set-up)
    modes = ["default", "retain"] if args.malloc == "both" else [args.malloc]
    for mode, threads, bs in itertools.product(modes, args.threads, args.batch):
        if mode == "retain" and not retain_freed_memory():
            sys.exit("mallopt is not available here (not glibc)")
        torch.set_num_threads(threads or default_threads)
        batches = [crops[i:i + bs] for i in range(0, len(crops), bs)]

        def embed_all(f: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray] = batches) -> np.ndarray:
            return np.concatenate([f(b) for b in batches])

        ref = embed_all(fns["eager-nchw"])
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        outs = {}
        for k, f in fns.items():  # warm-up (oneDNN primitive creation, JIT profiling passes, torch.compile)
            t0 = time.perf_counter()
            f(batches[0])
            first[k] = first.get(k, time.perf_counter() - t0)
            embed_all(f)
            outs[k] = embed_all(f)
        for _ in range(args.reps):
            for k, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                embed_all(f)
                times[k].append((time.perf_counter() - t0) * 1000 / len(crops))
                cpu[k].append((time.process_time() - c0) * 1000 / len(crops))
        base = statistics.median(times["eager-nchw"])
        print(f"\nmalloc {mode}, threads {torch.get_num_threads()}, batch {bs}")
        print(f"{'variant':25s} {'ms/img':>8s} {'min':>7s} {'cpu ms':>7s} {'speedup':>8s} {'cos min':>9s} "
              f"{'cos mean':>9s} {'1st batch':>8s}")
        for k in fns:
            med = statistics.median(times[k])
            cos = np.sum(outs[k] * ref, axis=1)
            print(f"{k:25s} {med:8.2f} {min(times[k]):7.2f} {statistics.median(cpu[k]):7.2f} {base / med:7.2f}x "
                  f"{cos.min():9.6f} {cos.mean():9.6f} {first[k]:7.2f}s")


if __name__ == "__main__":
    main()
