"""Multi-index hashing: radius queries give exactly the rows a full scan gives, and mix searches use them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_collection, save, synthetic_image
from PIL import Image

import imgrec.index as index_module
from imgrec.config import Config
from imgrec.mih import RadiusIndex, synthetic_hashes
from imgrec.search import Engine
from pipelines.ingest import ingest


def _scan(H: np.ndarray, q: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.bitwise_count(H ^ q[None, :]).sum(axis=1)
    rows = np.flatnonzero(d <= r)
    return rows, d[rows]


@pytest.mark.parametrize("words", [1, 2])
def test_radius_queries_equal_a_full_scan(words: int) -> None:
    rng = np.random.default_rng(words)
    for r in (0, 3, 8, 16):
        H = synthetic_hashes(6000, words, copies=0.3, max_flips=r + 3, seed=r)
        skewed = H.copy()  # biased bits as real hashes have, and a crowd of identical (flat-image) hashes
        skewed[:2000] &= rng.integers(0, 2**64, (2000, words), dtype=np.uint64)
        skewed[2000:3700] = skewed[0]
        for X in (H, skewed):
            table = RadiusIndex.build(X, r)
            queries = np.concatenate([X[rng.integers(0, len(X), 40)],  # rows, their near copies, random hashes
                                      rng.integers(0, 2**64, (10, words), dtype=np.uint64)])
            for q in queries:
                rows, d = table.query(q)
                want_rows, want_d = _scan(X, q, r)
                assert rows.tolist() == want_rows.tolist() and d.tolist() == want_d.tolist(), (words, r)


def test_the_table_probes_a_small_part_of_the_collection() -> None:
    H = synthetic_hashes(100_000, 2, copies=0.1, max_flips=8)
    table = RadiusIndex.build(H, 16)
    assert table.plan.est_candidates < len(H) / 20  # candidates verified per query, far from a scan
    assert table.nbytes < 12 * len(H) * len(table.plan.chunks)  # int32 order + tables, no copy per probe


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_collection(root, 14)
    original = synthetic_image(4242, (320, 240))
    save(original, root / "pairs" / "original.png")
    save(original.resize((240, 180), Image.Resampling.BILINEAR), root / "pairs" / "copy.jpg", quality=70)
    path = tmp_path_factory.mktemp("lake")
    ingest([root], Config.load(path, workers=1), progress=False, log=lambda s: None)
    return path


def test_mix_searches_give_the_same_results_with_the_table(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below RADIUS_INDEX_MIN images a mix search scans the hashes; with the table (threshold lowered, built in the
    background after RADIUS_INDEX_AFTER searches or at warm-up) it gives the same results."""
    queries = [[i] for i in range(16)] + [[0, 3, 5], [1, 2, 4, 14, 15]]  # 14, 15: the original and its copy
    scan_engine = Engine(Config.load(lake))
    scanned = [scan_engine.search(q, "mix", k=6) for q in queries]
    assert scan_engine.index is not None and scan_engine.index.radius_index(slice(0, 2), 16, now=True) is None

    monkeypatch.setattr(index_module, "RADIUS_INDEX_MIN", 0)
    engine = Engine(Config.load(lake))
    idx = engine.index
    assert idx is not None
    for _ in range(index_module.RADIUS_INDEX_AFTER):
        engine.search([0], "mix", k=6)
    deadline = time.monotonic() + 30
    while (table := idx.radius_index(slice(0, 2), 16)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(table, RadiusIndex)
    for q, before in zip(queries, scanned, strict=True):
        after = engine.search(q, "mix", k=6)
        assert [(r.image_id, round(r.score, 6)) for r in after.results] == \
               [(r.image_id, round(r.score, 6)) for r in before.results]
    rows, _ = table.query(np.asarray(idx.hashes[0]))
    assert 0 in rows.tolist()  # an image is within any radius of itself
