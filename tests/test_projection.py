"""The map of the collection (pipelines/project.py, imgrec/projection.py, pages/4_Explorer.py) on a real lake of
synthetic images: every image mapped, the same map on a rerun, new images placed by transform without a refit,
removed images dropped, the metrics on known inputs, atomic writes, the CLI, and the Explorer page (AppTest)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ingest_quietly, make_collection
from streamlit.testing.v1 import AppTest

from imgrec import projection as proj
from imgrec.index import IndexSet
from imgrec.lake import Lake
from pipelines.project import Params, evaluate, project

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
TIMEOUT = 90
SMALL = Params(sample=16, clusters=3, n_neighbors=8)  # fitted on 16 of the 24 images; the rest transformed


def _ingest(root: Path, lake: Path) -> None:

    ingest_quietly(root, lake)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A lake of 24 synthetic photos (two folders, each a labelled class in labels.csv); never mapped."""
    d = tmp_path_factory.mktemp("projlake")
    pics = d / "pics"
    paths = make_collection(pics, 24)
    with open(pics / "labels.csv", "w") as fh:
        fh.write("path,class_id\n")
        for p in paths:
            rel = p.relative_to(pics).as_posix()
            fh.write(f"{rel},{rel.split('/')[0]}\n")
    _ingest(pics, d / "lake")
    return pics, d / "lake"


@pytest.fixture
def lake(base: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the base lake (same images; its own projections)."""
    shutil.copytree(base[1], tmp_path / "lake")
    return tmp_path / "lake"


def _ids(lake: Path) -> np.ndarray:
    return np.asarray(IndexSet.open(Lake(lake)).ids)


# --- the pipeline -----------------------------------------------------------------------------------------------------


def test_every_image_mapped_and_rerun_is_identical(lake: Path) -> None:
    meta = project(lake, "embedding", SMALL)
    assert meta["status"] == "fitted" and meta["count"] == 24 and meta["fitted_on"] == 16
    assert set(meta["timings"]) >= {"pca", "fit", "transform", "cluster", "write"}
    maps = proj.read_maps(lake)
    c = maps.coords("embedding-umap-2d")
    assert np.array_equal(c["image_id"], _ids(lake))
    assert np.isfinite(c["x"]).all() and np.isfinite(c["y"]).all() and np.isnan(c["z"]).all()
    assert set(np.unique(c["cluster"])) <= {0, 1, 2}
    labels = {s["cluster"]: s for s in meta["clusters"]}
    assert sum(s["size"] for s in labels.values()) == 24
    assert all(s["label"] and 1 <= len(s["representatives"]) <= 6 for s in labels.values())

    assert project(lake, "embedding", SMALL)["status"] == "up to date"
    again = project(lake, "embedding", SMALL, refit=True)
    assert again["status"] == "fitted"
    c2 = proj.read_maps(lake).coords("embedding-umap-2d")
    for col in ("image_id", "x", "y", "cluster"):
        assert np.array_equal(c[col], c2[col]), col


@pytest.mark.parametrize(("features", "method", "dims"), [("color", "umap", 3), ("embedding", "pca", 2),
                                                          ("color", "tsne", 2)])
def test_other_maps(lake: Path, features: str, method: str, dims: int) -> None:
    from dataclasses import replace

    project(lake, features, replace(SMALL, method=method, dims=dims))
    key = proj.map_key(features, method, dims)
    maps = proj.read_maps(lake)
    c = maps.coords(key)
    assert len(c["image_id"]) == 24
    xyz = np.stack([c["x"], c["y"], c["z"]], 1)[:, :dims]
    assert np.isfinite(xyz).all()
    assert maps.meta[key]["method"] == method and maps.meta[key]["dims"] == dims
    assert proj.model_path(lake, key).is_file() == (method != "tsne")  # t-SNE has no transform to keep


def test_tsne_refused_above_its_limit(lake: Path) -> None:
    from pipelines.project import ProjectionRefused

    with pytest.raises(ProjectionRefused, match="t-SNE has no transform"):
        project(lake, "embedding", Params(method="tsne", tsne_max=10))


def test_new_images_placed_by_transform_removed_dropped(base: tuple[Path, Path], tmp_path: Path) -> None:
    pics = tmp_path / "pics"
    shutil.copytree(base[0], pics)
    lake = tmp_path / "lake"
    _ingest(pics, lake)
    project(lake, "embedding", SMALL)
    key = "embedding-umap-2d"
    before = proj.read_maps(lake).coords(key)
    model = proj.model_path(lake, key)
    model_bytes, model_mtime = model.read_bytes(), model.stat().st_mtime_ns

    gone = sorted(pics.glob("a/*"))[:3]
    for p in gone:
        p.unlink()
    make_collection(pics, 6, start=100)
    _ingest(pics, lake)
    meta = project(lake, "embedding", SMALL)
    assert meta["status"] == "updated" and meta["added"] == 6 and meta["removed"] == 3
    assert meta["refitted"] is False and meta["fitted_on"] == 16
    assert model.read_bytes() == model_bytes and model.stat().st_mtime_ns == model_mtime
    after = proj.read_maps(lake).coords(key)
    assert np.array_equal(after["image_id"], _ids(lake)) and len(after["image_id"]) == 27
    kept = np.isin(before["image_id"], after["image_id"])
    assert kept.sum() == 21
    pos = np.searchsorted(after["image_id"], before["image_id"][kept])
    for col in ("x", "y", "cluster"):  # the images already mapped did not move
        assert np.array_equal(after[col][pos], before[col][kept]), col
    assert np.isfinite(after["x"]).all()


# --- metrics ----------------------------------------------------------------------------------------------------------


def test_neighbour_preservation_known_inputs() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20))
    assert proj.neighbour_preservation(x, x, k=10) == 1.0
    assert proj.neighbour_preservation(x, x * 3.0 + 1.0, k=10) == 1.0  # similarity transform keeps every neighbour
    pairs = np.array([[0.0], [1.0], [10.0], [11.0]])  # nearest neighbours: 0-1 and 10-11
    assert proj.neighbour_preservation(pairs, np.array([[0.0], [5.0], [0.1], [5.1]]), k=1) == 0.0  # pairs swapped
    assert proj.neighbour_preservation(pairs, np.array([[0.0], [0.1], [5.0], [10.0]]), k=1) == 0.75
    shuffled = rng.permutation(x)
    assert proj.neighbour_preservation(x, shuffled[:, :2], k=10) < 0.15  # a random map: about k / N
    assert proj.neighbour_preservation(x, x, k=10, queries=np.arange(5)) == 1.0


def test_silhouette_matches_sklearn() -> None:
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    y = rng.integers(0, 4, 300)
    assert proj.silhouette(x, y, batch=64) == pytest.approx(silhouette_score(x, y), abs=1e-9)
    blobs = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(10, 0.1, (50, 2))])
    assert proj.silhouette(blobs, np.repeat(["a", "b"], 50)) > 0.95
    with pytest.raises(ValueError):
        proj.silhouette(blobs, np.zeros(100))


def test_mean_rgb_and_density() -> None:
    h = np.zeros((2, 128), np.float32)
    h[0, 0 * 16 + 3 * 4 + 3] = 1.0  # red hue, most saturated, brightest bin
    h[1, 3] = 1.0  # least saturated, brightest: near white-grey
    rgb = proj.mean_rgb(h)
    assert rgb[0, 0] > 200 and rgb[0, 1] < 120 and rgb[0, 2] < 60
    assert abs(int(rgb[1, 0]) - int(rgb[1, 2])) < 40
    cells = proj.density(np.array([0.0, 0.1, 5.0]), np.array([0.0, 0.1, 5.0]), bins=5)
    assert sum(c["count"] for c in cells) == 3


def test_evaluate_on_labelled_set(lake: Path) -> None:
    from dataclasses import replace

    project(lake, "embedding", SMALL)
    project(lake, "color", replace(SMALL, method="pca"))
    ev = evaluate(lake, k=5, global_queries=10)
    assert proj.evaluation_path(lake).is_file()
    (s,) = ev["sets"]
    assert s["images"] == 24 and s["classes"] == 2
    assert {m["key"] for m in s["maps"]} == {"embedding-umap-2d", "color-pca-2d"}
    for m in s["maps"]:
        assert 0.0 <= m["np_at_k"] <= 1.0 and -1.0 <= m["silhouette"] <= 1.0 and 0.5 <= m["cluster_purity"] <= 1.0
    assert {g["key"] for g in ev["global"]} == {"embedding-umap-2d", "color-pca-2d"}


# --- atomic files -----------------------------------------------------------------------------------------------------


def test_half_written_file_is_never_read(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project(lake, "embedding", replace_params(method="pca"))
    path = proj.table_path(lake)
    good = path.read_bytes()
    (path.parent / f".{path.name}.deadbeef.tmp").write_bytes(good[: len(good) // 2])  # a crash's leftover

    def crash(table: object, where: object, **kw: object) -> None:
        Path(str(where)).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        project(lake, "embedding", replace_params(method="pca", dims=3))
    monkeypatch.undo()
    assert path.read_bytes() == good
    maps = proj.read_maps(lake)
    assert maps.keys == ["embedding-pca-2d"] and maps.table.num_rows == 24


def replace_params(**kw: object) -> Params:
    from dataclasses import replace

    return replace(SMALL, **kw)  # type: ignore[arg-type]


# --- the command line -------------------------------------------------------------------------------------------------


def test_cli_project(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imgrec.cli import main

    rc = main(["project", "--lake", str(lake), "--method", "pca", "tsne", "--dims", "2", "--features", "embedding",
               "color", "--tsne-max", "10", "--sample", "16", "--clusters", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    status = {m["key"]: m["status"] for m in out["maps"]}
    assert status == {"embedding-pca-2d": "fitted", "embedding-tsne-2d": "refused", "color-pca-2d": "fitted",
                      "color-tsne-2d": "refused"}
    rc = main(["project", "--lake", str(lake), "--method", "pca", "--sample", "16", "--clusters", "3", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["maps"][0]["status"] == "up to date"
    assert main(["project", "--lake", str(lake.parent / "nothing")]) == 2


def test_heavy_modules_not_imported_by_the_cli() -> None:
    code = ("import sys, imgrec.cli, imgrec.projection, pipelines.project; "
            "print(sorted(m for m in ('umap', 'sklearn', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- the Explorer page ------------------------------------------------------------------------------------------------


def explorer(lake: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    at = at.switch_page("pages/4_Explorer.py").run()
    assert not at.exception, at.exception
    return at


def _texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "warning", "subheader")
                     for e in getattr(at, kind))


def test_page_missing_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = explorer(tmp_path / "no-lake", monkeypatch)
    assert "imgrec ingest" in _texts(at) and not at.error


def test_page_without_map_then_button_makes_one(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = explorer(lake, monkeypatch)
    assert "imgrec project --lake" in _texts(at) and not at.error
    (make,) = [b for b in at.button if b.label.startswith("Make the map now")]
    at = make.click().run()
    assert not at.exception and not at.error
    assert proj.read_meta(lake).keys() == {"embedding-umap-2d"}
    assert "Clusters" in _texts(at)


def test_page_with_maps(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project(lake, "embedding", SMALL)
    project(lake, "embedding", replace_params(dims=3))
    project(lake, "color", replace_params(method="pca"))
    evaluate(lake, k=5, global_queries=10)
    at = explorer(lake, monkeypatch)
    assert not at.error, [e.value for e in at.error]
    text = _texts(at)
    assert "What the map shows" in text and "Clusters" in text and "24 images in view" in text
    for by in ("mean", "label", "top"):
        at.radio(key="explorer_by").set_value(by).run()
        assert not at.exception and not at.error
    at.selectbox(key="explorer_map").set_value("embedding-umap-3d").run()
    assert not at.exception and not at.error


def test_open_in_search_puts_the_image_in_the_query(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project(lake, "embedding", SMALL)
    centre = proj.read_meta(lake)["embedding-umap-2d"]["clusters"][0]
    at = explorer(lake, monkeypatch)
    at = at.button(key=f"explorer_cluster_{centre['cluster']}").click().run()
    assert not at.exception
    image_id = int(centre["representatives"][0])
    assert at.session_state["picked"] == [image_id]
    assert at.multiselect(key="picked").value == [image_id]  # the Search page, with the image as its query
