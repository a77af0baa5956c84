"""Similarity joins against a naive reference (every pair scored exactly), for every measure, kNN and range, exact
and through the graphs; a self-join lists each pair once; resized copies find their originals; sides by folder,
empty and unknown sides; the CLI's Parquet, CSV and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_collection, save, synthetic_image

from imgrec import join as J
from imgrec.config import Config
from imgrec.measures import MEASURES
from imgrec.search import Engine
from pipelines.ingest import ingest

COPIES = 8


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    base = tmp_path_factory.mktemp("join")
    photos = make_collection(base / "photos", 24)
    for i, p in enumerate(photos[:COPIES]):  # resized, re-encoded copies, in a collection of their own
        img = Image.open(p).convert("RGB")
        save(img.resize((img.width * 3 // 4, img.height * 3 // 4)), base / "copies" / f"copy_{i:02d}.jpg", quality=85)
    save(synthetic_image(500), base / "copies" / "sub" / "lonely.jpg")
    ingest([base / "photos", base / "copies"], Config.load(base / "lake", workers=1), progress=False,
           log=lambda s: None)
    return base / "lake"


@pytest.fixture(scope="module")
def engine(lake: Path) -> Engine:
    return Engine(Config.load(lake))


def _reference(engine: Engine, left: str, right: str, measure: str, k: int | None, threshold: float | None
               ) -> dict[tuple[int, int], tuple[float, int]]:
    """Every pair of LEFT x RIGHT scored one by one: (left id, right id) -> (score, rank)."""
    idx = engine.index
    L, R = J.side(engine, left).rows, J.side(engine, right).rows
    self_join = np.array_equal(L, R)
    out: dict[tuple[int, int], tuple[float, int]] = {}
    listed: set[frozenset[int]] = set()
    for a in L:
        b = R[R != a]
        per = J.pair_similarities(idx, np.full(b.size, a), b)
        if measure == "mix":
            w = {m: v for m, v in engine.config.weights.items() if v > 0}
            score, _ = engine.mix(w).fuse(idx, {m: per[m] for m in w})
        else:
            score = per[measure]
        order = np.lexsort((idx.ids[b], -score))
        picked = order[: k] if k is not None else order[score[order] >= threshold - 1e-6]
        for rank, j in enumerate(picked, 1):
            pair = frozenset((int(a), int(b[j])))
            if self_join and pair in listed:
                continue
            listed.add(pair)
            out[(int(idx.ids[a]), int(idx.ids[b[j]]))] = (float(score[j]), rank)
    return out


def _got(table) -> dict[tuple[int, int], tuple[float, int]]:
    d = table.to_pydict()
    return {(a, b): (s, r) for a, b, s, r in zip(d["left_id"], d["right_id"], d["score"], d["rank"], strict=True)}


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want))[:10])
    for pair, (score, rank) in want.items():
        assert got[pair][0] == pytest.approx(score, abs=2e-5), pair
        assert got[pair][1] == rank, pair


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("graphs", [False, True])
def test_knn_and_range_equal_the_naive_reference(engine: Engine, measure: str, graphs: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if graphs:  # the search path of large right sides: graphs (and the near-duplicate table) then exact scores
        monkeypatch.setattr(J, "EXACT_RIGHT", 0)
    for left, right in (("copies", "photos"), ("all", "all")):
        _same(_got(J.join(engine, left, right, measure, k=3)), _reference(engine, left, right, measure, 3, None))
        ref_all = _reference(engine, left, right, measure, None, 0.0)
        cut = float(np.percentile([s for s, _ in ref_all.values()], 90))  # the best tenth of the pairs
        want = _reference(engine, left, right, measure, None, cut)
        if graphs and measure in ("embedding", "color"):  # a range from graph candidates: all of them here
            monkeypatch.setattr(J, "CANDIDATES", 64)
        _same(_got(J.join(engine, left, right, measure, threshold=cut)), want)


def test_a_self_join_lists_each_pair_once_and_never_an_image_with_itself(engine: Engine) -> None:
    table = J.join(engine, "all", "all", "embedding", k=4)
    d = table.to_pydict()
    pairs = [frozenset(p) for p in zip(d["left_id"], d["right_id"], strict=True)]
    assert len(pairs) == len(set(pairs)) and all(len(p) == 2 for p in pairs)
    assert table.column_names == list(J.COLUMNS)
    assert max(d["rank"]) == 4 and all(isinstance(p, str) and p for p in d["left_path"] + d["right_path"])


@pytest.mark.parametrize("measure, within", [("mix", 1), ("hash", 1), ("embedding", 3)])
def test_resized_copies_find_their_originals_first(engine: Engine, measure: str, within: int) -> None:
    """mix and hash, the measures for copies, put the original first; the embedding (content) near the top."""
    d = J.join(engine, "copies", "photos", measure, k=within).to_pydict()
    found: dict[str, list[str]] = {}
    for a, b in zip(d["left_path"], d["right_path"], strict=True):
        found.setdefault(Path(a).name, []).append(Path(b).stem)
    for i in range(COPIES):
        assert f"img_{i:03d}" in found[f"copy_{i:02d}.jpg"], (measure, found)
        if within == 1:
            assert found[f"copy_{i:02d}.jpg"] == [f"img_{i:03d}"]


def test_sides_by_folder_empty_and_unknown(engine: Engine, tmp_path: Path) -> None:
    sub = J.join(engine, "copies/sub", "photos", "mix", k=2).to_pydict()
    assert set(Path(p).name for p in sub["left_path"]) == {"lonely.jpg"} and len(sub["left_id"]) == 2
    folder = J.join(engine, "photos/a", "photos/b", "color", k=1).to_pydict()
    assert all("/a/" in p for p in folder["left_path"]) and all("/b/" in p for p in folder["right_path"])
    same = J.join(engine, "photos", "copies", "hash", threshold=1.0).to_pydict()  # identical hashes: copies only
    assert all(Path(b).stem == f"copy_{int(Path(a).stem[4:]):02d}" for a, b in
               zip(same["left_path"], same["right_path"], strict=True)) and all(s == 1.0 for s in same["score_hash"])
    with pytest.raises(J.JoinError, match="not a collection of the lake"):
        J.join(engine, "nope", "photos", k=1)
    with pytest.raises(J.JoinError, match="no folder"):
        J.join(engine, "photos/zzz", "photos", k=1)
    with pytest.raises(J.JoinError, match="either k"):
        J.join(engine, "all", "all")
    with pytest.raises(J.JoinError, match="more than 10 pairs"):
        J.join(engine, "all", "all", "color", threshold=0.0, max_pairs=10)
    # an empty side: a collection whose images are all gone
    save(synthetic_image(1), tmp_path / "gone" / "x.jpg")
    save(synthetic_image(2), tmp_path / "kept" / "y.jpg")
    cfg = Config.load(tmp_path / "lake", workers=1)
    ingest([tmp_path / "gone", tmp_path / "kept"], cfg, progress=False, log=lambda s: None)
    (tmp_path / "gone" / "x.jpg").unlink()
    ingest([tmp_path / "gone", tmp_path / "kept"], cfg, progress=False, log=lambda s: None)
    small = Engine(cfg)
    assert J.join(small, "gone", "kept", "mix", k=3).num_rows == 0 and J.join(small, "kept", "gone", k=3).num_rows == 0
    assert J.join(small, "kept", "kept", "embedding", k=3).num_rows == 0  # one image: no other to pair with


def test_progress_is_reported(engine: Engine) -> None:
    seen = []
    J.join(engine, "all", "photos", "embedding", k=2, batch=5, on_progress=lambda d, t: seen.append((d, t)))
    total = engine.size
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 2


def test_cli_writes_parquet_csv_and_json(lake: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgrec.cli", "join", *args, "--lake", str(lake)],
                              capture_output=True, text=True, timeout=300)

    out = cli("copies", "photos", "--measure", "mix", "--k", "2", "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert len(body["pairs"]) == 2 * (COPIES + 1) and {"total"} <= set(body["timings_ms"])
    assert set(body["pairs"][0]) == {"left_id", "left_path", "right_id", "right_path", "score", "scores", "rank"}
    assert set(body["pairs"][0]["scores"]) == {"embedding", "color", "hash"}
    parquet = tmp_path / "pairs.parquet"
    out = cli("all", "all", "--measure", "hash", "--threshold", "0.875", "--out", str(parquet))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(parquet)
    assert table.column_names == list(J.COLUMNS) and table.num_rows >= COPIES
    csv = tmp_path / "pairs.csv"
    assert cli("copies", "photos", "--k", "1", "--out", str(csv)).returncode == 0
    import csv as csvlib

    rows = list(csvlib.DictReader(csv.open()))
    assert list(rows[0])[:4] == ["left_id", "left_path", "right_id", "right_path"] and len(rows) == COPIES + 1
    bad = cli("nowhere", "photos", "--k", "1")
    assert bad.returncode == 2 and "not a collection of the lake" in bad.stderr and "Traceback" not in bad.stderr


def test_join_page_runs_a_join_in_the_background_and_shows_the_pairs(lake: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    from streamlit.testing.v1 import AppTest

    from imgrec import jobs

    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    app = Path(__file__).resolve().parents[1] / "app.py"
    at = AppTest.from_file(app, default_timeout=120).run().switch_page("pages/6_Join.py").run()
    assert not at.exception and at.title[0].value == "Join"
    assert {"all", "photos", "copies", "photos/a", "copies/sub"} <= set(at.selectbox(key="join_left").options)
    at.selectbox(key="join_left").set_value("copies")
    at.selectbox(key="join_right").set_value("photos")
    at.selectbox(key="join_measure").set_value("hash")
    at.slider(key="join_k").set_value(1)
    next(b for b in at.button if b.label == "Run the join").click().run()
    job = jobs.current(str(lake), "join")
    assert job is not None and job.wait(120).status == "done", job.state()
    at.run()
    assert not at.exception and not at.error
    scores = [m.value for m in at.markdown if str(m.value).startswith("**") and "rank" in str(m.value)]
    assert len(scores) == COPIES + 1 and all("rank 1" in s for s in scores)
    assert {b.label for b in at.get("download_button")} >= {"Export the pairs (CSV)", "Export the pairs (Parquet)"}
    # a range self-join under hash at the near-duplicate threshold: the copies and their originals as groups
    at.selectbox(key="join_left").set_value("all")
    at.selectbox(key="join_right").set_value("all")
    at.radio(key="join_mode").set_value("Range").run()
    next(b for b in at.button if b.label == "Run the join").click().run()
    assert jobs.current(str(lake), "join").wait(120).status == "done"
    at.run()
    assert not at.exception
    heads = [s.value for s in at.main.subheader]
    assert "all ~ all" in heads and any(h.startswith("Groups (") for h in heads)
    groups = [m.value for m in at.markdown if str(m.value).endswith(" images**")]
    assert len(groups) >= COPIES and all(g == "**2 images**" for g in groups[:COPIES])
