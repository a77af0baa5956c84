"""Shards served by Ray actors (``imgrec.shard_actors``) on a real multi-node Ray cluster on 127.0.0.1 (a head and
two worker nodes, started once for the module): the same results as the in-process sharded index, every measure, one
photo and two; ``imgrec serve-shards`` and ``imgrec search --shard-address``; a shard that does not answer in time
named in the result; a node removed, its shards reloaded elsewhere and the searches whole again; the app."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RAY_NODE, ingest_quietly, local_ray_cluster, make_collection

from imgrec.config import Config
from imgrec.lake import Lake
from imgrec.search import Engine, SearchResponse

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("color", "hash", "embedding", "mix")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with local_ray_cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 photos, indexed as 4 shards."""
    from pipelines.index import build_indexes

    base = tmp_path_factory.mktemp("served")
    make_collection(base / "photos", 40)
    ingest_quietly(base / "photos", base / "lake")
    meta = build_indexes(Config.load(base / "lake", index_shards=4))
    assert meta["shards"]["count"] == 4
    return base / "lake"


def _copy(lake: Path, dest: Path) -> Path:
    """The lake under another path: another lake to the shard servers (their names hold the lake's URL)."""
    shutil.copytree(lake, dest)
    return dest


def _same(a: SearchResponse, b: SearchResponse) -> None:
    assert [r.path for r in a.results] == [r.path for r in b.results]
    assert [r.score for r in a.results] == pytest.approx([r.score for r in b.results], abs=1e-6)


def _queries(engine: Engine) -> list[list[int]]:
    ids = sorted(int(i) for i in engine.index.ids)
    return [[ids[3]], [ids[7], ids[30]]]


def test_served_shards_search_like_the_shards_in_process(cluster: Any, lake: Path) -> None:
    from imgrec import shard_actors

    here = Engine(Config.load(lake))
    served = Engine(Config.load(lake, shard_address=cluster.address))
    assert type(here.index.searcher).__name__ == "ShardedGraphs"
    assert type(served.index.searcher).__name__ == "RayShards" and served.index.searcher.shards == 4
    for measure in MEASURES:
        for q in _queries(here):
            a, b = here.search(q, measure, k=5), served.search(q, measure, k=5)
            _same(a, b)
            assert b.missing == [] and not b.partial
    names = shard_actors.served(Lake(lake))
    assert len(names) == 4 and all(n.endswith(tuple(f"shard-00{i}" for i in range(4))) for n in names)
    nodes = {info["node"] for info in ray.get([ray.get_actor(n, namespace=shard_actors.NAMESPACE).info.remote()
                                               for n in names])}
    assert len(nodes) >= 2  # spread over the nodes, not all on one


def test_serve_shards_and_search_from_the_command_line(cluster: Any, lake: Path, tmp_path: Path) -> None:
    other = _copy(lake, tmp_path / "lake")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "imgrec.cli", *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    out = cli("serve-shards", "--lake", str(other), "--address", cluster.address)
    assert [s["shard"] for s in out["shards"]] == [f"shard-00{i}" for i in range(4)]
    assert sum(s["images"]["embedding"] for s in out["shards"]) == 40
    here = Engine(Config.load(other))
    for measure in ("embedding", "mix"):
        got = cli("search", f"id:{_queries(here)[0][0]}", "--lake", str(other), "--measure", measure, "--json",
                  "--shard-address", cluster.address)
        want = here.search(_queries(here)[0], measure, k=5)
        assert [r["path"] for r in got["results"]] == [r.path for r in want.results] and got["missing"] == []
    stopped = cli("serve-shards", "--lake", str(other), "--address", cluster.address, "--stop")["stopped"]
    assert len(stopped) == 4


def test_a_shard_that_does_not_answer_is_named(cluster: Any, lake: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrec import shard_actors
    from imgrec.searchers import shard_of

    other = _copy(lake, tmp_path / "lake")
    monkeypatch.setenv(shard_actors.FAULT_DELAY_ENV, "shard-002:30")  # reaches the actors this process starts
    slow = Engine(Config.load(other, shard_address=cluster.address, shard_timeout_s=1.5))
    here = Engine(Config.load(other))
    try:
        q = _queries(here)[0]
        t = time.perf_counter()
        resp = slow.search(q, "embedding", k=5, expand=False)
        assert time.perf_counter() - t < 15
        assert len(resp.missing) == 1 and resp.missing[0].startswith("shard-002 (")
        assert "no answer within 1.5 s" in resp.missing[0] and "% of the collection" in resp.missing[0]
        # the results: the best of the other three shards' images, with their scores
        ids = here.index.ids
        in_2 = set(ids[shard_of(ids, 4) == 2].tolist())
        assert in_2 and not in_2 & {r.image_id for r in resp.results}
        rest = [r for r in here.search(q, "embedding", k=40, expand=False).results if r.image_id not in in_2][:5]
        assert [r.image_id for r in resp.results] == [r.image_id for r in rest]
        assert [r.score for r in resp.results] == pytest.approx([r.score for r in rest], abs=1e-6)
        assert resp.to_json()["missing"] == resp.missing
    finally:
        shard_actors.stop(Lake(other))


def test_a_removed_node_has_its_shards_reloaded_elsewhere(cluster: Any, lake: Path, tmp_path: Path) -> None:
    from imgrec import shard_actors

    other = _copy(lake, tmp_path / "lake")
    extra = cluster.add_node(**RAY_NODE)
    cluster.wait_for_nodes()
    served = Engine(Config.load(other, shard_address=cluster.address, shard_timeout_s=30))
    here = Engine(Config.load(other))
    try:
        names = shard_actors.served(Lake(other))
        actors = [ray.get_actor(n, namespace=shard_actors.NAMESPACE) for n in names]
        before = ray.get([a.info.remote() for a in actors])
        # the added node if SPREAD put a shard there, else another worker node holding one (never the head)
        nodes = {n.node_id: n for n in cluster.list_all_nodes() if n is not cluster.head_node}
        holding = [i["node"] for i in before if i["node"] in nodes]
        assert holding, before
        gone = nodes[extra.node_id if extra.node_id in holding else holding[0]]
        on_gone = [i for i in before if i["node"] == gone.node_id]
        cluster.remove_node(gone)
        q = _queries(here)[1]
        deadline = time.monotonic() + 120
        while True:
            resp = served.search(q, "embedding", k=5)
            if not resp.missing:
                break
            assert time.monotonic() < deadline, resp.missing
        _same(here.search(q, "embedding", k=5), resp)
        after = {i["shard"]: i for i in ray.get([a.info.remote() for a in actors])}
        for moved in on_gone:
            assert after[moved["shard"]]["node"] != gone.node_id
            assert after[moved["shard"]]["pid"] != moved["pid"]
    finally:
        shard_actors.stop(Lake(other))


def test_the_app_searches_through_served_shards(cluster: Any, lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    monkeypatch.setenv("IMGREC_SHARD_ADDRESS", cluster.address)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    at = at.switch_page("pages/1_Search.py").run()
    ms = at.multiselect(key="picked")
    first = int(ms.options[0].split(" ")[0].lstrip("#"))
    ms.set_value([first])
    at.run()
    next(b for b in at.button if b.label == "Search").click().run()
    assert not at.exception and not at.error and not at.warning
    shown = [b.key for b in at.button if (b.key or "").startswith("more_")]
    want = Engine(Config.load(lake)).search([first], "mix", k=5, exclude_query=True)
    assert shown == [f"more_{r.image_id}" for r in want.results]
    from imgrec import ui

    assert type(ui.open_engine(str(lake)).index.searcher).__name__ == "RayShards"


def test_the_shards_of_an_s3_lake_served(cluster: Any, s3: Any, tmp_path: Path) -> None:
    """The actors download their shard of an ``s3://`` lake (the starting process's AWS settings go with them)."""
    import uuid

    from imgrec import shard_actors
    from imgrec.index import COMPLETE, index_root

    make_collection(tmp_path / "photos", 12)
    remote = f"{s3.bucket('imgrec-test')}/served-{uuid.uuid4().hex[:8]}"
    ingest_quietly(tmp_path / "photos", remote, index_shards=3)
    here, served = Engine(Config.load(remote)), Engine(Config.load(remote, shard_address=cluster.address))
    try:
        assert type(served.index.searcher).__name__ == "RayShards"
        for measure in MEASURES:
            _same(here.search([4], measure, k=5), served.search([4], measure, k=5))
        snap = served.index.path.name
        assert all((index_root(Lake(remote)) / shard_actors.SERVED / snap / f"shard-00{i}" / COMPLETE).is_file()
                   for i in range(3))
    finally:
        shard_actors.stop(Lake(remote))


def test_a_new_snapshot_is_served_and_the_old_one_stopped(cluster: Any, lake: Path, tmp_path: Path) -> None:
    from imgrec import shard_actors

    other = _copy(lake, tmp_path / "lake")
    served = Engine(Config.load(other, shard_address=cluster.address))
    try:
        old = served.index.path.name
        assert {n.split("/")[1] for n in shard_actors.served(Lake(other))} == {old}
        make_collection(tmp_path / "more", 4, start=100)
        ingest_quietly(tmp_path / "more", other)
        assert served.refresh()
        new = served.index.path.name
        assert new > old and served.index.size == 44
        assert {n.split("/")[1] for n in shard_actors.served(Lake(other))} == {new}
        here = Engine(Config.load(other))
        for q in ([int(here.index.ids[-1])], _queries(here)[1]):
            _same(here.search(q, "mix", k=5), served.search(q, "mix", k=5))
    finally:
        shard_actors.stop(Lake(other))


def test_shards_built_as_ray_tasks(cluster: Any, lake: Path, tmp_path: Path) -> None:
    """``--engine ray``: the shards' graphs built as Ray tasks on the cluster's nodes (inputs and graphs through the
    object store) search like those built here; an update ships the shard's previous graphs and rebuilds only it."""
    from pipelines.index import build_indexes
    from pipelines.ingest import ingest

    other = _copy(lake, tmp_path / "lake")
    meta = build_indexes(Config.load(other, engine="ray", index_shards=4), force=True)
    assert (meta["shards"]["count"], meta["shards"]["engine"], meta["shards"]["rebuilt"]) == (4, "ray", [0, 1, 2, 3])
    assert meta["shards"]["nodes"] >= 2
    here, there = Engine(Config.load(lake)), Engine(Config.load(other))
    for measure in MEASURES:
        for q in _queries(here):
            _same(here.search(q, measure, k=5), there.search(q, measure, k=5))
    new = make_collection(tmp_path / "more", 1, start=200)[0]
    ingest([tmp_path / "more"], Config.load(other, workers=1), progress=False, log=lambda s: None, build_index=False)
    meta = build_indexes(Config.load(other, engine="ray"))
    assert meta["shards"]["engine"] == "ray" and len(meta["shards"]["rebuilt"]) == 1
    assert meta["shards"]["unchanged"] == sorted(set(range(4)) - set(meta["shards"]["rebuilt"]))
    assert all(meta["hnsw"]["incremental"].values())  # the shard's graph updated from its previous one
    there.refresh()
    assert there.search([new], "embedding", k=1).results[0].path == str(new)
