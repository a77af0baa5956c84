"""The Collection page and what is behind it, against real lakes (no mocks): the statistics and duplicate groups of
imgrec.collection, background ingestion by imgrec.jobs (real subprocesses), and the page driven by AppTest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_quietly, jpeg_bytes, make_collection, synthetic_image
from streamlit.testing.v1 import AppTest

from imgrec import collection as col
from imgrec import jobs
from imgrec.config import Config
from imgrec.lake import Lake

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
PAGE = "pages/2_Collection.py"
TIMEOUT = 60


# --- a lake with exact and near copies -----------------------------------------------------------------------------


def _folder(root: Path) -> None:
    """6 distinct photos; p0 and p2 copied byte for byte; p1 and p2 resized and re-encoded (JPEG q=60); a broken
    file."""
    for seed in range(6):
        img = synthetic_image(seed)
        path = root / "a" / (f"p{seed}.png" if seed == 5 else f"p{seed}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        if seed == 5:
            img.save(path, format="PNG")
        else:
            path.write_bytes(jpeg_bytes(img, 90))
    (root / "copies").mkdir()
    shutil.copyfile(root / "a" / "p0.jpg", root / "copies" / "p0_copy.jpg")
    shutil.copyfile(root / "a" / "p2.jpg", root / "copies" / "p2_copy.jpg")
    (root / "near").mkdir()
    for seed in (1, 2):
        img = synthetic_image(seed)
        (root / "near" / f"p{seed}_small.jpg").write_bytes(jpeg_bytes(img.resize((96, 72)), 60))
    (root / "near" / "p1_q60.jpg").write_bytes(jpeg_bytes(synthetic_image(1), 60))
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")


EXACT = [{"a/p0.jpg", "copies/p0_copy.jpg"}, {"a/p2.jpg", "copies/p2_copy.jpg"}]
NEAR = [{"a/p1.jpg", "near/p1_small.jpg", "near/p1_q60.jpg"}, {"a/p2.jpg", "copies/p2_copy.jpg", "near/p2_small.jpg"}]


@pytest.fixture(scope="module")
def dup_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:

    base = tmp_path_factory.mktemp("duplake")
    _folder(base / "photos")
    lake = base / "lake"
    report = ingest_quietly(base / "photos", lake)
    assert report.processed == 11 and report.skipped == 1
    return lake


@pytest.fixture(scope="module")
def engine(dup_lake: Path) -> Iterator[object]:
    from imgrec.search import Engine

    eng = Engine(Config.load(dup_lake))
    yield eng
    eng.close()


def _paths(groups: list[col.DuplicateGroup]) -> list[set[str]]:
    return [{m.relpath for m in g.members} for g in groups]


def _check_group(g: col.DuplicateGroup) -> None:
    ids = g.ids
    assert len(ids) == len(set(ids)) >= 2  # an image is never its own duplicate, and no group of one
    assert all(Path(m.path).is_file() for m in g.members)
    assert g.distances is not None and len(g.distances) == g.size
    D = np.asarray(g.distances)
    assert (D == D.T).all() and (np.diag(D) == 0).all()
    assert g.max_distance == D.max()
    assert [m.distance for m in g.members] == D[0].tolist()


# --- imgrec.collection ---------------------------------------------------------------------------------------------


def test_overview_counts(engine: object) -> None:
    ov = col.overview(engine)
    assert ov.images == 11 and ov.skipped == 1 and ov.labelled == 11
    assert [c["images"] for c in ov.collections] == [11] and ov.bytes == sum(c["bytes"] for c in ov.collections)
    assert {f["format"]: f["images"] for f in ov.formats} == {"JPEG": 10, "PNG": 1}
    assert sum(r["images"] for r in col.size_histogram(engine)) == 11
    dims = col.dimension_histogram(engine)
    assert sum(r["images"] for r in dims) == 11 and {r["orientation"] for r in dims} == {"landscape"}
    q = {r["quantity"]: r for r in col.quantiles(engine)}
    assert q["width (px)"]["min"] == 96 and q["width (px)"]["max"] == 192
    assert col.common_dimensions(engine)[0] == {"dimensions": "192 x 144", "images": 9}
    labels = col.top_labels(engine, 5)
    assert labels and sum(r["images"] for r in labels) <= 11 and all(0 < r["mean_prob"] <= 1 for r in labels)
    (skipped,) = col.skipped_files(engine)
    assert skipped["relpath"] == "bad.jpg" and skipped["reason"]
    assert col.skipped_reasons(engine) == [{"reason": skipped["reason"], "files": 1}]
    (run,) = col.recent_runs(engine)
    assert run["ingested"] == 11 and not run["interrupted"]


def test_exact_duplicates_are_the_same_bytes(engine: object) -> None:
    exact = col.exact_duplicates(engine)
    assert exact.total_groups == 2 and exact.images == 4
    assert sorted(_paths(exact.groups), key=sorted) == EXACT
    for g in exact.groups:
        _check_group(g)
        assert g.kind == "exact" and g.max_distance == 0 and len({m.content_hash for m in g.members}) == 1
    assert exact.redundant_bytes == sum(g.members[0].size_bytes for g in exact.groups)
    assert col.exact_duplicates(engine, limit=1).total_groups == 2 and len(col.exact_duplicates(engine, 1).groups) == 1


def test_near_duplicates_are_resized_and_reencoded_copies(engine: object) -> None:
    near = col.near_duplicates(engine)  # phash+dhash, 10 bits
    assert near.measure == "phash+dhash" and near.max_distance == 10
    # p0 and its byte copy form a group of exact copies only: listed by exact_duplicates, not here
    assert sorted(_paths(near.groups), key=sorted) == NEAR
    assert near.total_groups == 2 and near.images == 6
    for g in near.groups:
        _check_group(g)
        assert g.kind == "near" and len({m.content_hash for m in g.members}) > 1
        assert g.members[0].relpath.startswith("a/")  # the largest image comes first
        assert g.max_distance <= 2 * 10  # chained at most once in groups of three
    for measure in ("phash", "dhash"):
        assert sorted(_paths(col.near_duplicates(engine, measure=measure).groups), key=sorted) == NEAR


@pytest.mark.parametrize("measure", ["phash+dhash", "phash"])
def test_near_groups_are_the_components_under_the_threshold(engine: object, measure: str) -> None:
    """Against brute force over every pair of the lake: same groups, for several thresholds."""
    idx = engine.index
    H = np.asarray(idx.hashes)[:, list(col.HASH_MEASURES[measure])]
    D = np.bitwise_count(H[:, None, :] ^ H[None, :, :]).sum(axis=2)
    meta = engine.lookup_ids([int(i) for i in idx.ids])
    for t in (0, 1, 3, 10, 24):
        expected = []
        seen: set[int] = set()
        for start in range(len(H)):
            if start in seen:
                continue
            comp, todo = {start}, [start]
            while todo:
                k = todo.pop()
                for j in np.flatnonzero(D[k] <= t):
                    if int(j) not in comp:
                        comp.add(int(j))
                        todo.append(int(j))
            seen |= comp
            hashes = {meta[int(idx.ids[k])]["content_hash"] for k in comp}
            if len(comp) > 1 and len(hashes) > 1:
                expected.append({meta[int(idx.ids[k])]["relpath"] for k in comp})
        near = col.near_duplicates(engine, t, measure)
        assert sorted(_paths(near.groups), key=sorted) == sorted(expected, key=sorted), t
        for g in near.groups:
            _check_group(g)
            # every member is linked to another one within the threshold
            Dg = np.asarray(g.distances) + np.eye(g.size, dtype=int) * 999
            assert (Dg.min(axis=1) <= t).all()
    if measure == "phash+dhash":  # no two of these files have the same 128 bits (p1 and its q=60 copy: same phash)
        assert col.near_duplicates(engine, 0, measure).groups == []


def test_near_duplicates_rejects_bad_parameters(engine: object) -> None:
    with pytest.raises(ValueError, match="unknown measure"):
        col.near_duplicates(engine, 5, "colour")
    with pytest.raises(ValueError, match="at least 0"):
        col.near_duplicates(engine, -1)


def _brute_pairs(H: np.ndarray, t: int) -> set[tuple[int, int]]:
    D = np.bitwise_count(H[:, None, :] ^ H[None, :, :]).sum(axis=2)
    i, j = np.nonzero(np.triu(D <= t, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("words", [1, 2])
def test_near_pairs_is_exact_without_comparing_all_pairs(words: int) -> None:
    rng = np.random.default_rng(words)
    for t in (0, 2, 5, 10, 16):
        H = col.synthetic_hashes(1500, words, copies=0.3, max_flips=t + 2, seed=t)
        skewed = H.copy()  # biased bits, as real hashes have, and repeated rows
        skewed[:500] &= rng.integers(0, 2**64, (500, words), dtype=np.uint64)
        skewed[500:520] = skewed[0]
        for X in (H, skewed):
            i, j, d = col.near_pairs(X, t)
            assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_pairs(X, t), t
            assert (i < j).all() and (d <= t).all()
    n = 20_000
    stats: dict[str, int] = {}
    col.near_pairs(col.synthetic_hashes(n, words), col.DEFAULT_MAX_DISTANCE["phash+dhash" if words == 2 else "phash"],
                   stats=stats)
    assert stats["candidates"] < n * n / 2 / 100  # verified pairs: a tiny fraction of all pairs


def test_components() -> None:
    i, j = np.array([0, 2, 5, 6]), np.array([1, 3, 6, 7])
    assert col.components(9, i, j).tolist() == [0, 0, 2, 2, 4, 5, 5, 5, 8]
    chain = np.arange(999)
    assert (col.components(1000, chain[::-1].copy(), chain[::-1] + 1) == 0).all()


# --- imgrec.jobs: real subprocesses --------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _count(lake: Path) -> int:
    conn = Lake(lake).connect()
    try:
        return conn.count()
    finally:
        conn.close()


def test_job_refuses_what_it_cannot_ingest(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with pytest.raises(jobs.JobError, match="does not exist"):
        jobs.start(tmp_path / "nope", lake)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(jobs.JobError, match="is not a folder"):
        jobs.start(tmp_path / "file.jpg", lake)
    with pytest.raises(jobs.JobError, match="give the path"):
        jobs.start("  ", lake)
    with pytest.raises(jobs.JobError, match="is a file"):
        jobs.start(tmp_path, tmp_path / "file.jpg")
    assert jobs.current(lake) is None and not lake.exists()


def test_job_failure_is_a_clear_error(tmp_path: Path) -> None:
    make_collection(tmp_path / "pics", 2)
    lake = tmp_path / "lake"
    (lake / "_snapshots").mkdir(parents=True)  # a lake of a newer imgrec: the subprocess must say so
    (lake / "_snapshots" / f"{0:020d}.json").write_text('{"format": 99}')
    state = jobs.start(tmp_path / "pics", lake).wait(TIMEOUT)
    assert state.status == "failed" and state.returncode == 2
    assert "lake format 99 is not supported" in state.error
    assert jobs.current(lake).state().status == "failed"  # any session sees the outcome


def test_job_progress_stop_and_resume(tmp_path: Path) -> None:
    n = 40
    make_collection(tmp_path / "pics", n)
    lake = tmp_path / "lake"
    job = jobs.start(tmp_path / "pics", lake, workers=1)
    assert jobs.current(lake) is job
    with pytest.raises(jobs.JobError, match="already running"):
        jobs.start(tmp_path / "pics", lake)
    _wait_for(lambda: job.state().done >= 1)
    assert job.state().total == n and job.state().running
    assert job.stop()
    state = job.wait(TIMEOUT)
    assert state.status == "stopped" and state.returncode == 130 and state.report["interrupted"]
    kept = _count(lake)
    assert 0 < kept < n and state.report["processed"] == kept  # what was done is committed

    job = jobs.start(str(tmp_path / "pics"), str(lake), workers=1)  # resumes
    fractions = []
    while job.running:  # what a page polls every second
        fractions.append(job.state().fraction)
        time.sleep(0.05)
    state = job.state()
    assert state.status == "done" and state.error is None and state.fraction == 1.0
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    assert state.report["processed"] == n - kept and state.report["unchanged"] == kept
    assert state.done == state.total == n - kept  # the last progress line
    assert state.report["images_per_s"] > 0 and not state.running
    assert _count(lake) == n
    jobs.dismiss(lake)
    assert jobs.current(lake) is None


# --- the page ------------------------------------------------------------------------------------------------------


def _page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    return at.switch_page(PAGE).run()


def _texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "warning", "success",
                                                "subheader") for e in getattr(at, kind))


def test_page_on_a_missing_lake_offers_to_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "no-lake-here"
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    at = _page()
    assert not at.exception and not at.error
    assert at.title[0].value == "Collection"
    assert any(f"There is no lake at `{lake}`" in i.value for i in at.info)
    assert at.text_input(key="collection_folder") and [b.label for b in at.main.button] == ["Start"]
    at.text_input(key="collection_folder").input(str(tmp_path / "missing")).run()
    at.button(key="collection_start").click().run()
    assert not at.exception
    (error,) = at.error
    assert "Cannot start" in error.value and "does not exist" in error.value
    assert not lake.exists()


def test_page_ingests_a_first_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "lake"
    make_collection(tmp_path / "pics", 3)
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    at = _page()
    at.text_input(key="collection_folder").input(str(tmp_path / "pics")).run()
    at.button(key="collection_start").click().run()
    assert not at.exception and not at.error
    job = jobs.current(lake)
    assert job is not None and job.folder == str(tmp_path / "pics")
    assert any("Ingesting" in c.value for c in at.caption) or not job.running
    job.wait(TIMEOUT)
    at.run()  # the next interaction: the new snapshot is served
    assert not at.exception and not at.error
    assert {m.label: m.value for m in at.main.metric}["Images"] == "3"
    assert any("Done: 3 images ingested" in s.value and "the page shows it now" in s.value for s in at.success)
    other = _page()  # another session sees the same job, its folder ready to run again
    assert any("Done: 3 images ingested" in s.value for s in other.success)
    assert other.text_input(key="collection_folder").value == str(tmp_path / "pics")
    at.button(key="collection_dismiss").click().run()
    assert jobs.current(lake) is None and not any("Done:" in s.value for s in at.success)


def test_page_on_a_filled_lake(dup_lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGREC_LAKE", str(dup_lake))
    at = _page()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.main.metric}
    assert metrics["Images"] == "11" and metrics["Collections"] == "1" and metrics["Unreadable files"] == "1"
    assert [s.value for s in at.subheader] == ["Exact duplicates: same bytes", "Near duplicates: same picture, "
                                                                               "other file"]
    page = _texts(at)
    assert "Duplicates are the same picture" in page and "Search" in page
    assert "**2 groups** · 4 files" in page and "**2 groups** · 6 images" in page
    for rel in ("copies/p0_copy.jpg", "near/p1_small.jpg", "near/p1_q60.jpg", "near/p2_small.jpg"):
        assert rel in page
    skipped = at.dataframe[-1].value  # the unreadable file, with its reason
    assert skipped["path"].str.endswith("/bad.jpg").tolist() == [True] and skipped["reason"][0]
    at.slider(key="collection_max_distance_phash+dhash").set_value(0).run()
    assert not at.exception and "No near-duplicates within 0 bits." in [s.value for s in at.success]
    at.selectbox(key="collection_measure").set_value("phash").run()
    assert not at.exception and "**2 groups** · 6 images" in _texts(at)
