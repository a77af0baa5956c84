"""The measure-interface restructuring kept every result and score: the same searches and joins over one lake of
real photos, answered by this checkout and by the commit before it (``BASELINE``, taken from git), must agree.

Skipped where ../shared/data is absent, or where the clone lacks the baseline commit (a shallow clone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import ingest_quietly
from PIL import Image

BASELINE = "637d643"  # main before imgrec.measures (the engine with a branch per measure)
ROOT = Path(__file__).resolve().parents[1]
RECORDER = Path(__file__).with_name("search_record.py")
pytestmark = pytest.mark.shared


def _baseline_tree(dest: Path) -> Path:
    """The baseline commit's ``imgrec`` and ``pipelines`` packages, extracted from git into ``dest``."""
    try:
        data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", BASELINE, "imgrec", "pipelines"],
                              check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {BASELINE} is not in this clone (shallow?): nothing to compare with")
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _record(code: Path, lake: Path, uploads: Path, out: Path) -> dict[str, Any]:
    """The recorder run in a fresh interpreter whose ``imgrec`` and ``pipelines`` are those under ``code``."""
    prog = (f"import sys; sys.path.insert(0, {str(code)!r}); sys.argv = ['x', {str(lake)!r}, {str(uploads)!r}, "
            f"{str(out)!r}]; import imgrec; assert imgrec.__file__.startswith({str(code)!r}), imgrec.__file__; "
            f"exec(compile(open({str(RECORDER)!r}).read(), 'search_record.py', 'exec'), "
            "{'__name__': '__main__'})")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", prog], cwd=code, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def photo_lake(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A lake of 200 Corel and 120 Flowers photos plus resized and re-encoded copies of a few (near-duplicates),
    its spaces fitted (whitening, colour layout PCA, augmentation) as on a large lake; and a folder of uploads:
    changed copies of photos the lake does not hold."""
    corel, flowers = shared_data / "corel1k_wang" / "images", shared_data / "oxford_flowers17" / "images"
    if not corel.is_dir() or not flowers.is_dir():
        pytest.skip("corel1k_wang or oxford_flowers17 is absent")
    tmp = tmp_path_factory.mktemp("equivalence")
    uploads = tmp / "uploads"
    uploads.mkdir()
    corel_classes = sorted(p for p in corel.iterdir() if p.is_dir())
    flower_classes = sorted(p for p in flowers.iterdir() if p.is_dir())
    picked = [f for c in corel_classes for f in sorted(c.glob("*.jpg"))[:20]]
    picked += [f for c in flower_classes[:6] for f in sorted(c.glob("*.jpg"))[:20]]
    tree = tmp / "photos"
    for f in picked:  # copied into one collection folder (files, not links: links out of a root are not read)
        dest = tree / f.parent.parent.parent.name / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    (tree / "copies").mkdir()
    for i, f in enumerate(picked[::40]):
        img = Image.open(f).convert("RGB")
        img.resize((img.width // 2, img.height // 2)).save(tree / "copies" / f"half_{i}.jpg", quality=80)
    for i, f in enumerate([sorted(c.glob("*.jpg"))[30] for c in corel_classes[:3] + flower_classes[:3]]):
        img = Image.open(f).convert("RGB")
        img.resize((img.width * 3 // 4, img.height * 3 // 4)).save(uploads / f"upload_{i}.jpg", quality=70)
    lake = tmp / "lake"
    ingest_quietly(tree, lake, space_min_images=200)
    return lake, uploads


def test_every_search_and_join_gives_the_baseline_results_and_scores(photo_lake: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    lake, uploads = photo_lake
    old = _record(_baseline_tree(tmp_path / "baseline"), lake, uploads, tmp_path / "before.json")
    new = _record(ROOT, lake, uploads, tmp_path / "after.json")
    assert old["ids"] == new["ids"]
    assert old["searches"].keys() == new["searches"].keys() and len(new["searches"]) > 100
    for name, before in old["searches"].items():
        after = new["searches"][name]
        assert [r["id"] for r in after["results"]] == [r["id"] for r in before["results"]], name
        assert after["candidates"] == before["candidates"] and after["distance"] == before["distance"], name
        for a, b in zip(after["results"], before["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-6), name
            assert a["scores"].keys() == b["scores"].keys() and a["ranks"] == b["ranks"], name
            assert a["path"] == b["path"], name
            for m, v in b["scores"].items():
                assert a["scores"][m] == pytest.approx(v, abs=1e-6), (name, m)
            assert a["contributions"].keys() == b["contributions"].keys(), name
            for m, v in b["contributions"].items():
                assert a["contributions"][m] == pytest.approx(v, abs=1e-6), (name, m)
    assert old["joins"].keys() == new["joins"].keys()
    for name, before in old["joins"].items():
        after = new["joins"][name]
        assert after["left_id"] == before["left_id"] and after["right_id"] == before["right_id"], name
        assert after["rank"] == before["rank"], name
        for c in ("score", "score_embedding", "score_color", "score_hash"):
            assert after[c] == pytest.approx(before[c], abs=1e-6), (name, c)
