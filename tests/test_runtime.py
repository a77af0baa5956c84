"""The embedding backends: ONNX Runtime gives torch's vectors, lakes made with one are searched with the other, the
query path of a new photo never imports torch, and the backend choice falls back in words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_quietly, jpeg_bytes, make_collection, synthetic_image

from imgrec.config import Config
from imgrec.features.embed import Embedder, spec
from imgrec.features.extract import decode_side, extract
from imgrec.features.runtime import (
    BackendUnavailable,
    OnnxEmbedder,
    ensure_onnx,
    label_names,
    onnx_file,
    resolve,
    weights_checksum,
)
from imgrec.search import Engine

LITE0 = spec("efficientnet-lite0")


@pytest.fixture(scope="module")
def both() -> tuple[Embedder, OnnxEmbedder]:
    return Embedder(LITE0.name, "cpu"), OnnxEmbedder(LITE0.name, threads=1)


def _crops(blobs: list[bytes]) -> np.ndarray:
    return np.stack([extract(b, model=LITE0, min_side=decode_side(LITE0)).crop for b in blobs])


def _same(torch_e: Embedder, onnx_e: OnnxEmbedder, crops: np.ndarray) -> None:
    a, ai, ap = torch_e.embed(crops)
    b, bi, bp = onnx_e.embed(crops)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (ai[:, 0] == bi[:, 0]).all()  # the same top label
    np.testing.assert_allclose(ap[:, 0], bp[:, 0], atol=1e-3)


def test_onnx_vectors_equal_torch_on_generated_images(both) -> None:
    _same(*both, _crops([jpeg_bytes(synthetic_image(i, (300, 220))) for i in range(12)]))


@pytest.mark.shared
def test_onnx_vectors_equal_torch_on_real_photos(both, shared_data: Path) -> None:
    files = sorted((shared_data / "oxford_flowers17" / "images").glob("*/*.jpg"))[::40]
    files += sorted((shared_data / "corel1k_wang" / "images").glob("*/*.jpg"))[::50]
    files += sorted((shared_data / "dogs_vs_cats_200px" / "images").glob("*.jpg"))[::500]
    assert len(files) >= 40
    crops = _crops([f.read_bytes() for f in files])
    for i in range(0, len(crops), 16):  # every image, in batches as ingestion runs them
        _same(*both, crops[i : i + 16])


def test_a_batch_run_in_micro_batches_gives_the_vectors_of_one_run(both) -> None:
    """The embedder splits a batch into runs of a few images (faster: they stay in the caches); each image keeps its
    own vector, in order, whatever the split."""
    crops = _crops([jpeg_bytes(synthetic_image(i, (260, 200))) for i in range(7)])
    whole = OnnxEmbedder(LITE0.name, threads=1, micro_batch=1 << 30).embed(crops)
    assert both[1].micro_batch == 2
    for split in (both[1], OnnxEmbedder(LITE0.name, threads=1, micro_batch=3)):
        got = split.embed(crops)
        np.testing.assert_allclose(got[0], whole[0], atol=2e-6)
        assert (got[1] == whole[1]).all()
        np.testing.assert_allclose(got[2], whole[2], atol=2e-6)
    one = both[1].embed(crops[4:5])  # and one image alone is the same image's vector
    np.testing.assert_allclose(one[0][0], whole[0][4], atol=2e-6)


def test_export_is_cached_under_the_weights_checksum(both) -> None:
    torch_e, onnx_e = both
    path = ensure_onnx(LITE0)
    assert path == onnx_file(LITE0, weights_checksum(LITE0)) and weights_checksum(LITE0) in path.name
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["checksum"] == torch_e.checksum == onnx_e.checksum == weights_checksum(LITE0)
    assert tuple(side["labels"]) == torch_e.labels == onnx_e.labels == label_names(LITE0)
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(LITE0) == path and path.stat().st_mtime_ns == mtime  # made once, then reused


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("torch", "auto", LITE0.name) == ("torch", None)
    assert resolve("onnx", "cpu", LITE0.name) == ("onnx", None)
    assert resolve("auto", "cuda", LITE0.name) == ("torch", None)  # the GPU path is torch's
    assert resolve("auto", "auto", "resnet50")[0] == "torch"  # only the Lite models are exported
    with pytest.raises(BackendUnavailable, match="runs on the CPU"):
        resolve("onnx", "cuda", LITE0.name)
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        resolve("tensorrt", "auto", LITE0.name)
    monkeypatch.setattr("imgrec.features.runtime.gpu_visible", lambda: False)
    assert resolve("auto", "auto", LITE0.name) == ("onnx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    backend, why = resolve("auto", "auto", LITE0.name)
    assert backend == "torch" and "onnxruntime is not installed" in why and "pip install onnxruntime" in why
    with pytest.raises(BackendUnavailable, match="not installed"):
        resolve("onnx", "auto", LITE0.name)


@pytest.mark.parametrize("made_with, searched_with", [("onnx", "torch"), ("torch", "onnx")])
def test_a_lake_made_with_one_backend_is_searched_with_the_other(tmp_path: Path, made_with: str,
                                                                  searched_with: str) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 8)
    report = ingest_quietly(root, lake, backend=made_with, workers=2)
    assert report.backend == made_with and report.processed == 8
    engine = Engine(Config.load(lake, backend=searched_with))
    query = jpeg_bytes(synthetic_image(3))  # a re-encoded copy of img_003: decoded and embedded by the other backend
    resp = engine.search([query], measure="embedding", k=3)
    assert engine.embedder().backend == searched_with  # and no ModelMismatch
    assert resp.results[0].relpath.endswith("img_003.jpg") and resp.results[0].score > 0.9


def test_a_new_photo_is_searched_without_importing_torch(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 6)
    ingest_quietly(root, lake)
    photo = tmp_path / "new.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_image(2)))
    code = ("import sys, json; from imgrec.cli import main; rc = main(['search', sys.argv[1], '--lake', sys.argv[2], "
            "'--measure', 'mix', '--json']); print('MODULES', json.dumps(sorted(m for m in ('torch', 'polars', "
            "'duckdb', 'torchvision') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(photo), str(lake)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    results = json.loads(text[: text.index("MODULES")])["results"]
    assert results[0]["path"].endswith("img_002.webp")
    assert json.loads(text.split("MODULES", 1)[1]) == []  # no torch, no polars, no DuckDB for a new photo


def test_usearch_then_onnxruntime_does_not_crash() -> None:
    """usearch's static libstdc++ crashed ONNX Runtime (>= 1.23) imported after it; imgrec loads the system's first."""
    code = "import imgrec, usearch.index, onnxruntime; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-500:])
