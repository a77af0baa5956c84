"""Search end to end on generated images: copies find each other, multi-image aggregation, filters, ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, make_collection, save, synthetic_image
from PIL import Image

from imgrec.config import Config
from imgrec.index import IndexSet, StaleIndex
from imgrec.lake import Lake, LakeError
from imgrec.search import Engine, ModelMismatch, QueryError
from pipelines.ingest import ingest

MEASURES = ("color", "hash", "embedding", "mix")


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (120, 90)) -> Image.Image:
    return Image.new("RGB", size, rgb)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    make_collection(root, 12)
    original = synthetic_image(777, (320, 240))
    save(original, root / "pairs" / "original.png")
    save(original.resize((240, 180), Image.Resampling.BILINEAR), root / "pairs" / "copy_small.jpg", quality=75)
    # for the aggregation: two pure colours, an image half of each, and a twin of the first
    save(solid((220, 30, 30)), root / "agg" / "red.png")
    save(solid((30, 30, 220)), root / "agg" / "blue.png")
    half = solid((220, 30, 30))
    half.paste(solid((30, 30, 220), (60, 90)), (60, 0))
    save(half, root / "agg" / "half.png")
    save(solid((221, 31, 29)), root / "agg" / "red_twin.png")
    path = tmp_path_factory.mktemp("lake")
    ingest([root], Config.load(path, workers=2), progress=False)
    return root, path


@pytest.fixture(scope="module")
def engine(lake: tuple[Path, Path]) -> Engine:
    return Engine(Config.load(lake[1]))


def rel(engine: Engine, image_id: int) -> str:
    return engine.cursor().execute("SELECT relpath FROM images WHERE image_id = ?", [image_id]).fetchall()[0][0]


@pytest.mark.parametrize("measure", MEASURES)
def test_an_image_and_its_resized_reencoded_copy_find_each_other(engine: Engine, lake: tuple[Path, Path],
                                                                measure: str) -> None:
    root, _ = lake
    for query, other in (("original.png", "copy_small.jpg"), ("copy_small.jpg", "original.png")):
        resp = engine.search([root / "pairs" / query], measure, k=3, exclude_query=True)
        assert resp.results[0].relpath == f"pairs/{other}", (measure, query, [r.relpath for r in resp.results])
        first = resp.results[0]
        assert first.path == str(root / "pairs" / other)
        assert measure == "mix" or first.scores[measure] == pytest.approx(first.score)


@pytest.mark.parametrize("measure", MEASURES)
def test_a_query_file_of_the_collection_finds_itself_first(engine: Engine, lake: tuple[Path, Path],
                                                          measure: str) -> None:
    root, _ = lake
    target = sorted(root.glob("a/*"))[2]
    resp = engine.search([target], measure, k=5)
    assert resp.results[0].path == str(target)
    assert resp.results[0].score == pytest.approx(1.0, abs=1e-3)
    assert [r.rank for r in resp.results] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(resp.results, resp.results[1:], strict=False))
    assert set(resp.timings_ms) >= {"decode", "features", "candidates", "rerank", "metadata", "total"}


def test_several_query_images_rank_what_relates_to_all_of_them(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    queries = [root / "agg" / "red.png", root / "agg" / "blue.png"]
    resp = engine.search(queries, "color", k=20, exclude_query=True, distance="hellinger")
    order = [r.relpath for r in resp.results]
    # half.png is close to both queries, red_twin.png is identical to one and far from the other
    assert order.index("agg/half.png") < order.index("agg/red_twin.png")
    assert order[0] == "agg/half.png"
    # averaging would have put the twin first: the aggregation is what makes the difference
    mean = [r.relpath for r in engine.search(queries, "color", k=20, exclude_query=True, aggregate="mean",
                                                       distance="hellinger").results]
    assert mean.index("agg/red_twin.png") < mean.index("agg/half.png")


def test_query_by_id_reuses_stored_features_and_embeds_nothing(lake: tuple[Path, Path]) -> None:
    root, path = lake
    engine = Engine(Config.load(path))
    image_id = engine.cursor().execute("SELECT image_id FROM images WHERE relpath = 'pairs/original.png'"
                                       ).fetchall()[0][0]
    by_id = engine.search([image_id], "embedding", k=4)
    assert engine._embedder is None  # no model was loaded
    by_file = engine.search([root / "pairs" / "original.png"], "embedding", k=4)
    assert [r.image_id for r in by_id.results] == [r.image_id for r in by_file.results]
    assert by_id.results[0].image_id == image_id
    excluded = engine.search([f"id:{image_id}"], "mix", k=4, exclude_query=True)
    assert image_id not in [r.image_id for r in excluded.results]


def test_bytes_upload_equals_file_query(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    f = root / "pairs" / "original.png"
    a = engine.search([f.read_bytes()], "mix", k=5)
    b = engine.search([f], "mix", k=5)
    assert [r.image_id for r in a.results] == [r.image_id for r in b.results]
    assert a.queries == ["upload"]


def test_k_larger_than_the_collection_returns_everything(engine: Engine) -> None:
    resp = engine.search(["id:0"], "hash", k=1000)
    assert len(resp.results) == engine.size
    assert len({r.image_id for r in resp.results}) == engine.size


def test_range_query_returns_everything_above_the_threshold(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    resp = engine.search([root / "agg" / "red.png"], "color", threshold=0.9)
    names = {r.relpath for r in resp.results}
    assert names == {"agg/red.png", "agg/red_twin.png"}
    assert all(r.score >= 0.9 for r in resp.results)


def test_filters_on_collection_and_folder(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    resp = engine.search([root / "pairs" / "original.png"], "embedding", k=50, folders=["b"])
    assert resp.results and all(r.relpath.startswith("b/") for r in resp.results)
    resp = engine.search([root / "pairs" / "original.png"], "embedding", k=50, folders=["b/deeper"])
    assert resp.results and all(r.relpath.startswith("b/deeper/") for r in resp.results)
    assert engine.search(["id:0"], "hash", collections=[root.name]).results
    assert engine.search(["id:0"], "hash", collections=["no-such-collection"]).results == []


def test_filter_on_predicted_label(engine: Engine) -> None:
    label, n = engine.cursor().execute(
        "SELECT label, count(*) AS n FROM labels GROUP BY label ORDER BY n DESC, label LIMIT 1").fetchall()[0]
    resp = engine.search(["id:0"], "color", k=100, labels=[label])
    assert len(resp.results) == n
    assert {r.label for r in resp.results} == {label}
    assert engine.search(["id:0"], "color", labels=["no such label"]).results == []


def test_negative_examples_push_down_what_resembles_them(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    half = engine.search([root / "agg" / "half.png"], "color", k=20, exclude_query=True)
    names = [r.relpath for r in half.results]
    assert set(names[:3]) == {"agg/red.png", "agg/red_twin.png", "agg/blue.png"}  # half red, half blue
    less_red = engine.search([root / "agg" / "half.png"], "color", k=20, exclude_query=True,
                             negatives=[root / "agg" / "red.png"])
    after = [r.relpath for r in less_red.results]
    assert "agg/red.png" not in after  # a negative example never comes back
    assert after[0] == "agg/blue.png"
    assert after.index("agg/red_twin.png") > 3  # the red twin lost its place to images with no red
    assert less_red.negatives == ["red.png"]
    with pytest.raises(QueryError, match="negative"):
        engine.search(["id:0"], "color", negatives=["id:1"] * 6)


def test_results_carry_their_rank_under_each_measure_and_mix_contributions(engine: Engine) -> None:
    resp = engine.search(["id:3"], "mix", k=8)
    for r in resp.results:
        assert set(r.ranks) == {"embedding", "color", "hash"}
        assert all(1 <= v <= resp.candidates for v in r.ranks.values())
        assert set(r.contributions) == set(engine.config.weights)
        assert sum(r.contributions.values()) == pytest.approx(r.score, abs=1e-4)  # one query: exact
    single = engine.search(["id:3"], "color", k=8)
    assert [r.ranks["color"] for r in single.results] == [r.rank for r in single.results]
    assert all(not r.contributions for r in single.results)


def test_history_remembers_searches_and_extra_stages(lake: tuple[Path, Path]) -> None:
    engine = Engine(Config.load(lake[1]))
    assert engine.history() == []
    assert set(engine.startup_ms) == {"index_open"}  # DuckDB opens when something needs it, not before
    engine.thumbnails([0])  # from the index's store
    assert "duckdb" not in engine.startup_ms
    engine.lookup_ids([0])  # metadata the index does not hold: DuckDB
    assert {"index_open", "duckdb"} <= set(engine.startup_ms)
    a = engine.search(["id:0"], "hash", k=3)
    b = engine.search(["id:1", "id:2"], "color", k=4)
    engine.record_stage(b.query_id, "render", 12.5)
    h = engine.history()
    assert [e["query_id"] for e in h] == [a.query_id, b.query_id]
    assert h[0]["measure"] == "hash" and h[1]["n_queries"] == 2 and h[1]["uploads"] == 0
    assert h[1]["timings_ms"]["render"] == 12.5 and "render" not in h[0]["timings_ms"]
    assert h[0]["timings_ms"]["total"] == a.timings_ms["total"]


def test_every_distance_of_every_measure_runs(engine: Engine) -> None:
    from imgrec.measures import DISTANCES

    for measure, distances in DISTANCES.items():
        for d in distances:
            resp = engine.search(["id:3"], measure, k=3, distance=d)
            assert resp.results[0].image_id == 3, (measure, d)
            assert 0.0 <= resp.results[-1].score <= 1.0


def test_clear_errors(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="1 to 5"):
        engine.search(["id:0"] * 6, "mix")
    with pytest.raises(QueryError, match="not an image|corrupt"):
        engine.search([b"<html>not a picture</html>"], "color")
    with pytest.raises(QueryError, match="not in the lake"):
        engine.search([10**9], "hash")
    with pytest.raises(QueryError, match="unknown measure"):
        engine.search(["id:0"], "smell")
    with pytest.raises(QueryError, match="distances"):
        engine.search(["id:0"], "color", distance="cosine")
    with pytest.raises(QueryError, match="cannot read"):
        engine.search([tmp_path / "missing.jpg"], "color")
    empty = Engine(Config.load(tmp_path / "nolake"))
    with pytest.raises(LakeError, match="no images yet"):
        empty.search([jpeg_bytes(synthetic_image(1))], "color")


def test_stale_index_is_detected_and_rebuilt(tmp_path: Path) -> None:
    root, path = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 4)
    cfg = Config.load(path, workers=1)
    ingest([root], cfg, progress=False)
    engine = Engine(cfg)
    assert engine.size == 4
    make_collection(root, 2, start=50)
    ingest([root], cfg, progress=False, build_index=False)
    snap = Lake(path).snapshot()
    with pytest.raises(StaleIndex):
        IndexSet.open(Lake(path), expect_snapshot=snap)
    assert engine.refresh() is True  # picks up the new snapshot and rebuilds the index
    assert engine.size == 6 and engine.index.snapshot == snap
    assert len(engine.search(["id:0"], "embedding", k=10).results) == 6


def test_query_with_another_model_than_the_index_is_refused(tmp_path: Path) -> None:
    root, path = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 3)
    cfg = Config.load(path, workers=1)
    ingest([root], cfg, progress=False)
    engine = Engine(cfg)
    engine.index.meta["model"]["checksum"] = "0000000000000000"  # as if the lake came from other weights
    with pytest.raises(ModelMismatch, match="differ"):  # an upload must be embedded: refused
        engine.search([(root / "a" / "img_000.jpg").read_bytes()], "embedding")
    meta = json.loads((engine.index.path / "meta.json").read_text())
    assert meta["model"]["checksum"] != "0000000000000000"


def test_hash_scores_are_exact_over_the_whole_collection(engine: Engine) -> None:
    idx = engine.index
    q = np.asarray(idx.hashes[5])
    resp = engine.search(["id:5"], "hash", k=engine.size)
    got = {r.image_id: r.score for r in resp.results}
    for row, image_id in enumerate(idx.ids):
        bits = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, idx.hashes[row], strict=True))
        assert got[int(image_id)] == pytest.approx(1 - bits / 128, abs=1e-6)


def test_model_warm_up_in_the_background(lake: tuple[Path, Path]) -> None:
    engine = Engine(Config.load(lake[1]))
    thread = engine.warm_up()
    assert thread is not None
    assert engine.search(["id:1"], "hash", k=2).results  # searches without the model are not held up
    thread.join(timeout=120)
    assert engine._embedder is not None
    assert engine.warm_up() is None  # already loaded
    before = engine._embedder
    engine.search([lake[0] / "pairs" / "original.png"], "embedding", k=2)
    assert engine._embedder is before


def test_duckdb_retrieval_by_id_and_by_path(engine: Engine, lake: tuple[Path, Path]) -> None:
    root, _ = lake
    path = str(root / "pairs" / "original.png")
    by_path = engine.lookup_paths([path, str(root / "not-there.jpg")])
    assert list(by_path) == [path]
    rows = engine.lookup_ids([by_path[path], 10**9])
    assert list(rows) == [by_path[path]]
    row = rows[by_path[path]]
    assert row["path"] == path and row["relpath"] == "pairs/original.png" and row["file_name"] == "original.png"
    assert (row["width"], row["height"], row["format"]) == (320, 240, "PNG")


def test_a_file_of_the_lake_is_searched_with_its_stored_features(lake: tuple[Path, Path], tmp_path: Path) -> None:
    root, path = lake
    engine = Engine(Config.load(path))
    resp = engine.search([root / "pairs" / "original.png"], "embedding", k=2)
    assert engine._embedder is None  # unchanged file of the lake: nothing decoded, no model loaded
    assert resp.timings_ms["decode"] == 0
    outside = tmp_path / "same.png"  # the same bytes outside the lake are decoded and embedded
    outside.write_bytes((root / "pairs" / "original.png").read_bytes())
    resp2 = engine.search([outside], "embedding", k=2)
    assert engine._embedder is not None and resp2.timings_ms["decode"] > 0
    assert [r.image_id for r in resp2.results] == [r.image_id for r in resp.results]


def test_an_upload_searched_again_reuses_its_features(lake: tuple[Path, Path]) -> None:
    root, path = lake
    engine = Engine(Config.load(path))
    data = (root / "pairs" / "original.png").read_bytes()
    first = engine.search([data], "color", k=5)  # colour only: no embedding computed
    assert first.timings_ms["decode"] > 0
    again = engine.search([data], "color", k=8)
    assert again.timings_ms["decode"] == 0  # nothing decoded the second time
    assert [r.image_id for r in again.results[:5]] == [r.image_id for r in first.results]
    emb = engine.search([data], "embedding", k=5)  # needs the embedding the cache does not hold yet
    assert emb.timings_ms["decode"] > 0 and engine._embedder is not None
    mix = engine.search([data], "mix", k=5)
    assert mix.timings_ms["decode"] == 0 and mix.results[0].relpath == emb.results[0].relpath


def test_result_metadata_comes_from_the_index_and_matches_duckdb(engine: Engine) -> None:
    assert engine.index.metadata is not None and engine.index.metadata.num_rows == engine.size
    resp = engine.search([int(engine.index.ids[3])], "mix", k=8)
    rows = engine.lookup_ids([r.image_id for r in resp.results])  # DuckDB
    for r in resp.results:
        m = rows[r.image_id]
        assert (r.path, r.collection, r.relpath, r.width, r.height, r.label) == (
            m["path"], m["collection"], m["relpath"], m["width"], m["height"], m["label"])


def test_the_middle_of_several_query_images(engine: Engine) -> None:
    from imgrec.search import QueryFeatures, _centroid

    words = [(0b1011, 2**63 + 1), (0b0011, 2**63), (0b1000, 1)]
    feats = [QueryFeatures({"hist": np.eye(4, dtype=np.float32)[i], "hashes": np.array(w, np.uint64),
                            "emb": np.eye(3, dtype=np.float32)[i]}) for i, w in enumerate(words)]
    mid = _centroid(engine.index, feats)
    assert mid.get("hashes").tolist() == [0b1011, 2**63 + 1]  # each bit as most query images have it
    assert np.allclose(mid.get("hist"), [1 / 3, 1 / 3, 1 / 3, 0])
    assert np.allclose(mid.get("emb"), np.ones(3) / np.sqrt(3))
    partial = QueryFeatures({"hist": feats[1].get("hist"), "hashes": feats[1].get("hashes")})
    assert _centroid(engine.index, [feats[0], partial]).get("emb") is None
