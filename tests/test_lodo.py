"""Leave-one-dataset-out: the pure protocol on made-up scores, and `imgrec eval --protocol lodo` end to end on two
small generated sets (one labelled by labels.csv, one by its file names' prefix)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import class_picture, save

from imgrec import lodo, metrics
from imgrec import similarity as sim
from imgrec.cli import main
from imgrec.evaluate import EvalError, read_labels


def _set(name: str, n: int, classes: int, noise: dict[str, float], seed: int) -> lodo.SetScores:
    """Scores where each measure sees the classes through its own amount of noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    queries = np.arange(n)
    same = (labels[:, None] == labels[None, :]).astype(np.float32)
    scores = {}
    for m, s in noise.items():
        S = (1 / (1 + np.exp(-(0.6 * same + s * rng.standard_normal((n, n)))))).astype(np.float32)  # in (0, 1)
        if m == "hash":  # as in real photos: no two of them near-duplicates (below the near-duplicate level)
            S = 0.5 * S
        S[queries, queries] = -np.inf
        scores[m] = S
    return lodo.SetScores(name, labels, queries, scores, {"embedding": 0.0, "color": 0.0, "hash": 0.875})


def test_average_precisions_match_the_metric() -> None:
    ss = _set("a", 40, 4, {"embedding": 0.3, "color": 0.5, "hash": 1.0}, 0)
    aps = lodo.average_precisions(ss.scores["color"], ss.labels, ss.queries)
    for q in (0, 7, 39):
        order = np.argsort(-ss.scores["color"][q], kind="stable")[:-1]
        flags = ss.labels[order] == ss.labels[q]
        assert aps[q] == pytest.approx(metrics.average_precision(flags, int(flags.sum())))


def test_bootstrap_interval_covers_the_mean() -> None:
    diff = np.random.default_rng(0).normal(0.01, 0.05, 500)
    lo, hi = lodo.bootstrap(diff)
    assert lo < diff.mean() < hi and hi - lo < 0.02
    assert lodo.bootstrap(np.zeros(50)) == (0.0, 0.0)


def test_protocol_chooses_on_the_other_sets_and_reports_the_held_out_one() -> None:
    # the embedding is the best measure everywhere; colour helps on two sets and is noise on the third
    sets = [_set("a", 60, 3, {"embedding": 0.25, "color": 0.3, "hash": 2.0}, 1),
            _set("b", 60, 3, {"embedding": 0.25, "color": 0.3, "hash": 2.0}, 2),
            _set("c", 60, 3, {"embedding": 0.25, "color": 5.0, "hash": 2.0}, 3)]
    sets[0].agreement, sets[1].agreement, sets[2].agreement = 0.5, 0.45, 0.05  # colour agrees with content on a, b
    report = lodo.protocol(sets)
    families = ["any", *sim.FUSIONS]
    assert [(f["family"], f["held_out"]) for f in report["folds"]] == [(m, s) for m in families for s in "abc"]
    for f in report["folds"]:
        assert f["held_out"] not in f["chosen_on"] and len(f["chosen_on"]) == 2
        assert f["best_single"] == "embedding"
        assert f["ci95"][0] <= f["diff"] <= f["ci95"][1]
        assert f["map"] == pytest.approx(report["table"][f["held_out"]][f["chosen"]])
    # held out c (colour is noise there), a weight chosen on a and b hurts; the gate keeps colour out of c
    weighted_c = next(f for f in report["folds"] if f["family"] == "weighted" and f["held_out"] == "c")
    gated_c = next(f for f in report["folds"] if f["family"] == "gated" and f["held_out"] == "c")
    assert weighted_c["diff"] < 0 and weighted_c["ci95"][1] < 0
    assert gated_c["diff"] == pytest.approx(0.0, abs=1e-9)
    assert report["method"] == "gated" and "gated" in report["never_worse"]
    assert "weighted" not in report["never_worse"]
    text = lodo.format_lodo(report)
    assert "| method | held out |" in text and f"default: gated, chosen on all sets: {report['final']}" in text


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    csv_set = tmp_path_factory.mktemp("csvset")
    rows = []
    for c, hue in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200)]):
        for i in range(8):
            rel = f"{c}/{i}.jpg"
            save(class_picture(hue, 10 * c + i), csv_set / rel, quality=92)
            rows.append({"path": rel, "class_id": c})
    with (csv_set / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "class_id"])
        w.writeheader()
        w.writerows(rows)
    prefix_set = tmp_path_factory.mktemp("prefixset")
    for c, hue in (("sun", (230, 200, 40)), ("sea", (30, 90, 200))):
        for i in range(10):
            save(class_picture(hue, 100 + i), prefix_set / "images" / f"{c}.{i}.jpg", quality=92)
    return csv_set, prefix_set


def test_labels_by_file_name_prefix(two_sets: tuple[Path, Path]) -> None:
    _, prefix_set = two_sets
    items = read_labels(prefix_set, "prefix")
    assert len(items) == 20 and {c for _, c in items} == {0, 1}
    assert dict(items)["images/sea.3.jpg"] == 0 and dict(items)["images/sun.3.jpg"] == 1  # numbered in name order
    assert read_labels(prefix_set, "auto") == items  # no labels.csv: the prefix
    with pytest.raises(EvalError, match="labels.csv"):
        read_labels(prefix_set, "csv")


def test_eval_lodo_end_to_end(two_sets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IMGREC_EVAL_CACHE", str(tmp_path / "cache"))
    csv_set, prefix_set = two_sets
    assert main(["eval", "--protocol", "lodo", str(csv_set), str(prefix_set), "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert f"| gated | {csv_set.name} | " in out and f"| gated | {prefix_set.name} | " in out
    assert "never below the best single measure held-out" in out
    report = lodo.run([(str(csv_set), "auto"), (str(prefix_set), "auto")], limit=12)
    assert report["queries"] == {csv_set.name: 12, prefix_set.name: 12}
    table = report["table"]
    # colour families: colour and the mix find the classes (chance would be about 1/3 and 1/2)
    assert table[csv_set.name]["color"] > 0.8 and table[prefix_set.name]["color"] > 0.8
    assert {f["family"] for f in report["folds"]} == {"any", *sim.FUSIONS} and report["method"] in sim.FUSIONS
    with pytest.raises(EvalError, match="at least two"):
        lodo.run([(str(csv_set), "auto")])
