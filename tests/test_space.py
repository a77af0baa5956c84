"""The tuned embedding space (PCA-whitening + database-side augmentation) and alpha query expansion, end to end.

The defaults switch them on from 1000 images; here the threshold is lowered so that a small generated lake uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_quietly, jpeg_bytes, make_collection, synthetic_image

from imgrec import similarity as sim
from imgrec.config import Config
from imgrec.index import IndexSet, current_dir
from imgrec.lake import Lake
from imgrec.measures import Embedding
from imgrec.search import Engine
from pipelines.index import build_indexes

TUNED = {"space_min_images": 30, "embedding_dims": 24, "dba_k": 2, "expand_k": 2, "layout_dims": 16, "layout_dba_k": 2}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("space") / "photos"
    lake = root.parent / "lake"
    make_collection(root, 40)
    ingest_quietly(root, lake, **TUNED)  # ingestion builds the index with the same settings
    return root, lake


def test_a_lake_over_the_threshold_is_whitened_and_augmented(tuned: tuple[Path, Path]) -> None:
    _, lake = tuned
    idx = IndexSet.open(Lake(lake))
    space = idx.meta["space"]
    assert space["whitened"] and space["dims"] == 24 and space["dba_k"] == 2 and space["fitted_on"] == 40
    assert idx.embeddings.shape == (40, 24)
    assert np.allclose(np.linalg.norm(np.asarray(idx.embeddings, np.float32), axis=1), 1.0, atol=1e-2)
    mean, proj = idx.whitening
    assert mean.shape == (1280,) and proj.shape == (1280, 24)
    v = idx.project(np.random.default_rng(0).normal(size=1280).astype(np.float32))
    assert v.shape == (24,) and np.isclose(np.linalg.norm(v), 1.0)


def test_stored_vectors_are_the_whitened_neighbourhood_averages(tuned: tuple[Path, Path]) -> None:
    _, lake = tuned
    idx = IndexSet.open(Lake(lake))
    con = Lake(lake).connect()
    raw = np.stack(con.frame("SELECT image_id, vector FROM embeddings ORDER BY image_id")["vector"].to_numpy())
    con.close()
    V = sim.apply_whitening(raw, *idx.whitening)
    S = V @ V.T
    np.fill_diagonal(S, np.inf)
    nn = np.argsort(-S, axis=1)[:, :2]  # itself first, then its nearest
    assert np.allclose(np.asarray(idx.embeddings, np.float32), sim.augment(V, nn), atol=2e-3)


def test_an_uploaded_copy_finds_its_original_first(tuned: tuple[Path, Path]) -> None:
    root, lake = tuned
    engine = Engine(Config.load(lake, **TUNED), auto_index=False)
    assert Embedding("cosine", engine.config).tuned(engine.index)  # embedding queries expanded by default
    for i in (0, 6, 9, 15):  # JPEG originals, re-encoded
        resp = engine.search([jpeg_bytes(synthetic_image(i), 90)], "embedding", k=3)
        assert Path(resp.results[0].path).stem == f"img_{i:03d}"
        assert "expand" in resp.timings_ms
    engine.close()


def test_expansion_is_the_alpha_weighted_sum_of_the_nearest(tuned: tuple[Path, Path]) -> None:
    _, lake = tuned
    engine = Engine(Config.load(lake, **TUNED), auto_index=False)
    idx = engine.index
    X = np.asarray(idx.embeddings, np.float32)
    qid, row = int(idx.ids[5]), 5
    s = X @ X[row]
    s[row] = -np.inf  # itself is left out of its own expansion
    top = np.argsort(-s)[:2]
    q = sim.expand_query(X[row], X[top], s[top], 3.0)
    expected = [int(i) for i in idx.ids[np.argsort(-(X @ q))] if i != qid][:5]
    got = engine.search([qid], "embedding", k=5, exclude_query=True)
    assert [r.image_id for r in got.results] == expected
    plain = engine.search([qid], "embedding", k=5, exclude_query=True, expand=False)
    s[row] = -np.inf
    assert [r.image_id for r in plain.results] == [int(i) for i in idx.ids[np.argsort(-s)[:5]]]
    assert "expand" not in plain.timings_ms
    engine.close()


def test_an_incremental_build_keeps_the_space_and_augments_only_new_images(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 36)
    ingest_quietly(root, lake, **TUNED)
    config = Config.load(lake, **TUNED)
    before = IndexSet.open(Lake(lake))
    old_ids, old_vecs = np.array(before.ids), np.array(before.embeddings)
    old_whitening = [np.array(a) for a in before.whitening]
    make_collection(root, 4, start=100)
    ingest_quietly(root, lake, **TUNED)
    meta = build_indexes(config)  # already built by the ingestion: its meta
    after = IndexSet.open(Lake(lake))
    assert after.size == 40 and meta["space"] == before.meta["space"]  # fitted on 36, kept (not doubled since)
    assert meta["hnsw"]["incremental"]["embedding"]
    assert all(np.array_equal(a, b) for a, b in zip(after.whitening, old_whitening, strict=True))
    assert np.array_equal(np.asarray(after.embeddings)[after.rows(old_ids)], old_vecs)
    make_collection(root, 40, start=200)  # the lake doubles: a new space, fitted again, the graph rebuilt
    ingest_quietly(root, lake, **TUNED)
    meta = build_indexes(config)
    assert meta["space"]["fitted_on"] == 80 and not meta["hnsw"]["incremental"]["embedding"]


def test_a_small_lake_keeps_the_model_vectors(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 8)
    ingest_quietly(root, lake)
    engine = Engine(Config.load(lake))
    assert not Embedding("cosine", engine.config).tuned(engine.index) and engine.index.whitening is None
    assert engine.index.embeddings.shape == (8, 1280)
    meta = json.loads((current_dir(Lake(lake)) / "meta.json").read_text())
    assert meta["space"] == {"whitened": False, "dims": 1280, "dba_k": 0}
    resp = engine.search([engine.index.ids[0]], "embedding", k=3)
    assert "expand" not in resp.timings_ms
    engine.close()


def test_raw_vectors_stream_in_image_order_without_removed_images(tmp_path: Path) -> None:
    """The index build reads the model's vectors batch by batch into a memory-mapped file: every current image's
    vector at its row, in image_id order, none of a deleted image, whatever the batch size."""
    from pipelines.index import _raw_embeddings

    root, lake = tmp_path / "photos", tmp_path / "lake"
    paths = make_collection(root, 9)
    ingest_quietly(root, lake)
    paths[4].unlink()  # its embedding row stays in the lake's history, the image is gone
    ingest_quietly(root, lake)
    con = Lake(lake).connect()
    try:
        want = con.frame("SELECT i.image_id, e.vector FROM images i JOIN embeddings e USING (image_id) "
                         "ORDER BY i.image_id")
        assert con.one("SELECT count(*) FROM embeddings") > len(want) == 8
        ids = want["image_id"].to_numpy()
        for batch in (1, 3, 100):
            got = _raw_embeddings(con, ids, 1280, tmp_path / f"raw-{batch}.npy", batch=batch)
            assert np.array_equal(np.asarray(got), np.stack(want["vector"].to_list()).astype(np.float32))
        with pytest.raises(Exception, match="lack embeddings"):
            _raw_embeddings(con, np.append(ids, ids.max() + 100), 1280, tmp_path / "raw-missing.npy")
    finally:
        con.close()


# --- the colour layout: the colour measure's default, in its own PCA space -------------------------------------------


def test_the_colour_layout_is_pcad_augmented_and_searched_by_default(tuned: tuple[Path, Path]) -> None:
    from imgrec.features.color import LAYOUT_DIMS

    _, lake = tuned
    engine = Engine(Config.load(lake, **TUNED))
    idx = engine.index
    assert idx.meta["color_space"] == {"whitened": True, "power": 0.0, "dba_k": 2, "raw_dims": LAYOUT_DIMS,
                                       "dims": 16, "fitted_on": 40}
    L = np.asarray(idx.layout, dtype=np.float32)
    assert L.shape == (40, 16) and np.allclose(np.linalg.norm(L, axis=1), 1.0, atol=1e-2)
    assert (idx.path / "layout.usearch").is_file() and "layout" in idx.meta["baselines"]["color"]
    mean, proj = idx.layout_space
    assert mean.shape == (LAYOUT_DIMS,) and proj.shape == (LAYOUT_DIMS, 16)
    q = int(idx.ids[3])
    resp = engine.search([q], "color", k=5, exclude_query=True, expand=False)
    assert resp.distance == "layout"
    s = L @ L[3]
    s[3] = -np.inf
    assert [r.image_id for r in resp.results] == [int(i) for i in idx.ids[np.argsort(-s, kind="stable")[:5]]]
    assert resp.results[0].score == pytest.approx(float(np.max(s)), abs=1e-2)
    # the colour query is expanded like the embedding (its own nearest in the layout space)
    expanded = engine.search([q], "color", k=5, exclude_query=True)
    assert "expand" in expanded.timings_ms
    # an uploaded copy is projected into the same space: it finds its original first
    root, _ = tuned
    path = sorted(root.glob("a/*"))[1]
    up = engine.search([path.read_bytes()], "color", k=1)
    assert up.results[0].path == str(path)
    engine.close()


def test_a_lake_ingested_before_the_layout_keeps_the_histogram(tmp_path: Path) -> None:
    from imgrec.lake import SNAPSHOTS
    from imgrec.search import QueryError

    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 10)
    ingest_quietly(root, lake)
    assert IndexSet.open(Lake(lake)).layout is not None
    # the lake as an older imgrec wrote it: its latest snapshot, without the colour layout table
    snaps = sorted((lake / SNAPSHOTS).glob("*.json"))
    d = json.loads(snaps[-1].read_text())
    del d["tables"]["color_layout"]
    d["snapshot"] += 1
    (lake / SNAPSHOTS / f"{d['snapshot']:020d}.json").write_text(json.dumps(d))
    build_indexes(Config.load(lake))
    engine = Engine(Config.load(lake))
    assert engine.index.snapshot == d["snapshot"] and engine.index.layout is None
    assert "color_space" not in engine.index.meta and not (engine.index.path / "layout.usearch").exists()
    resp = engine.search([int(engine.index.ids[0])], "color", k=3)
    assert resp.distance == "hellinger" and resp.results[0].image_id == int(engine.index.ids[0])
    assert engine.search([int(engine.index.ids[0])], "mix", k=3).results[0].image_id == int(engine.index.ids[0])
    with pytest.raises(QueryError, match="no colour layout"):
        engine.search([int(engine.index.ids[0])], "color", k=3, distance="layout")
    engine.close()
    # the next ingestion computes the missing layouts (from the files) and the index has it again
    ingest_quietly(root, lake)
    idx = IndexSet.open(Lake(lake))
    assert idx.layout is not None and idx.size == 10
    con = Lake(lake).connect()
    assert con.one("SELECT count(DISTINCT image_id) FROM color_layout") == 10
    con.close()
    engine = Engine(Config.load(lake))
    assert engine.search([int(idx.ids[0])], "color", k=3).distance == "layout"
    engine.close()
