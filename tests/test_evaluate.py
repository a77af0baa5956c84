"""Retrieval metrics on known rankings, and `imgrec eval` end to end on a small generated labelled set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import class_picture, save

from imgrec import metrics
from imgrec.cli import main
from imgrec.evaluate import TRANSFORMS, EvalError, evaluate, format_table, load_reports, transform

# --- metrics ------------------------------------------------------------------------------------------------------


def test_average_precision_on_known_rankings() -> None:
    assert metrics.average_precision([1, 1, 0, 0], 2) == 1.0
    assert metrics.average_precision([0, 1, 0, 1], 2) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert metrics.average_precision([1, 0, 0, 0], 3) == pytest.approx(1 / 3)  # 2 relevant never found
    assert metrics.average_precision([0, 0], 2) == 0.0 and metrics.average_precision([1], 0) == 0.0


def test_precision_and_recall_at_k() -> None:
    r = [1, 0, 1, 1, 0, 0]
    assert metrics.precision_at(r, 1) == 1.0 and metrics.precision_at(r, 4) == 0.75
    assert metrics.precision_at([1, 1], 5) == 0.4  # a short ranking: missing places are misses
    assert metrics.recall_at(r, 3, 4) == 0.5 and metrics.recall_at(r, 100, 3) == 1.0
    assert metrics.recall_at(r, 3, 0) == 0.0


def test_precision_recall_curve_is_interpolated_and_decreasing() -> None:
    curve = metrics.precision_recall_curve([0, 1, 1, 0, 1], 3, points=5)
    assert [x for x, _ in curve] == [0, 0.25, 0.5, 0.75, 1.0]
    precisions = [p for _, p in curve]
    assert precisions == sorted(precisions, reverse=True)
    assert precisions[0] == pytest.approx(2 / 3) and precisions[-1] == pytest.approx(3 / 5)
    assert metrics.precision_recall_curve([1, 0], 0, points=3) == [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0)]


# --- the evaluation -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for c, hue in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200)]):
        for i in range(9):
            rel = f"images/{c:02d}/{i}.jpg"
            save(class_picture(hue, 10 * c + i), root / rel, quality=92)
            rows.append({"path": rel, "class_id": c, "class_name": f"c{c}"})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "class_id", "class_name"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def report(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    mp.setenv("IMGREC_EVAL_CACHE", str(tmp_path_factory.mktemp("evalcache")))
    try:
        yield evaluate(dataset, ("color", "hash", "embedding", "mix"), near_sample=4, sets_per_class=2)
    finally:
        mp.undo()


def test_every_image_a_query(report: dict) -> None:
    assert report["images"] == 27 and report["classes"] == 3
    for m in ("color", "hash", "embedding", "mix"):
        r = report["measures"][m]
        assert r["queries"] == 27
        assert 0.0 <= r["map"] <= 1.0 and 0.0 <= r["p@5"] <= 1.0 and r["r@100"] == 1.0  # 26 ranked: all found
        assert len(r["pr_curve"]) == 21 and r["query_ms"] > 0
    # the classes are colour families: colour finds them, a random ranking would give mAP ~ 8/26
    assert report["measures"]["color"]["map"] > 0.9
    assert report["measures"]["color"]["p@5"] > 0.9


def test_multi_image_and_mixed_sets(report: dict) -> None:
    multi = report["multi"]["color"]
    assert multi["2"]["sets"] == 6 and multi["5"]["sets"] == 6 and multi["mixed"]["sets"] == 2
    assert multi["3"]["p@5"] >= report["measures"]["color"]["p@5"] - 1e-9
    assert multi["mixed"]["p@5"] == 1.0  # one image of each of two colour families: everything close is relevant


def test_near_duplicates_hash_finds_resized_and_reencoded_copies(report: dict) -> None:
    near = report["near_duplicates"]
    assert set(near) == {"color", "hash", "embedding", "mix"} and set(near["hash"]) == set(TRANSFORMS)
    assert near["hash"]["resize"] == 1.0 and near["hash"]["jpeg"] == 1.0
    assert near["hash"]["flip"] < 1.0  # a mirrored picture is another hash: what hashes are not for


def test_report_saved_reused_and_formatted(report: dict, dataset: Path) -> None:
    saved = load_reports(report["lake"])
    assert [r["name"] for r in saved] == [dataset.name] and saved[0]["measures"]["color"] == report["measures"]["color"]
    table = format_table(report)
    assert "| color |" in table and "recall@1 of the original" in table


def test_cli_json_reuses_the_cached_lake(dataset: Path, report: dict, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGREC_EVAL_CACHE", str(Path(report["lake"]).parent))
    assert main(["eval", str(dataset), "--measure", "hash", "--no-multi", "--no-near", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measures"]["hash"]["map"] == report["measures"]["hash"]["map"]
    assert out["snapshot"] == report["snapshot"]  # nothing ingested again
    (saved,) = load_reports(report["lake"])  # the partial run updated its part of the saved report, kept the rest
    assert set(saved["measures"]) == {"color", "hash", "embedding", "mix"} and saved["near_duplicates"]


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(EvalError, match="no labels.csv"):
        evaluate(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,1\n")
    assert main(["eval", str(tmp_path)]) == 2
    assert "needs the columns path and class_id" in capsys.readouterr().err


def test_transforms_make_decodable_copies() -> None:
    from imgrec.imaging import decode

    img = class_picture((120, 80, 200), 1)
    for name in TRANSFORMS:
        d = decode(transform(img, name), min_side=None)
        assert d.width > 0
    assert decode(transform(img, "resize"), min_side=None).width == 80
    with pytest.raises(ValueError, match="unknown transform"):
        transform(img, "blur")


# --- the Quality page ---------------------------------------------------------------------------------------------


def test_quality_page_without_and_with_a_report(report: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "app.py"
    monkeypatch.setenv("IMGREC_LAKE", str(tmp_path / "no-lake"))
    at = AppTest.from_file(app, default_timeout=60).run().switch_page("pages/5_Quality.py").run()
    assert not at.exception and at.title[0].value == "Quality"
    assert any("No evaluation report" in i.value and "imgrec eval DATASET_DIR" in i.value for i in at.info)

    monkeypatch.setenv("IMGREC_LAKE", report["lake"])
    at = AppTest.from_file(app, default_timeout=60).run().switch_page("pages/5_Quality.py").run()
    assert not at.exception and not at.error
    assert at.tabs[0].label == report["name"]
    single = at.dataframe[0].value
    assert list(single["measure"]) == ["embedding", "color", "hash", "mix"]
    assert single.set_index("measure").loc["color", "mAP"] == report["measures"]["color"]["map"]
    assert len(at.dataframe) == 3  # single image, several images, near-duplicates
    near = at.dataframe[2].value.set_index("measure")
    assert near.loc["hash", "resize"] == report["near_duplicates"]["hash"]["resize"]
