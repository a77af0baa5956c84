"""The `imgrec` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_collection


def imgrec(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "imgrec.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"imgrec {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    make_collection(root, 6)
    (root / "bad.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 truncated")
    lake = tmp_path_factory.mktemp("lake")
    out = imgrec("ingest", str(root), "--lake", str(lake), "--json", "--workers", "2")
    report = json.loads(out.stdout)
    assert report["processed"] == 6 and report["skipped"] == 1 and report["images_per_s"] > 0
    assert {"decode", "embed", "write", "color", "hash"} <= set(report["stages"])
    return root, lake


def test_stats_json_counts_and_skipped(cli_lake: tuple[Path, Path]) -> None:
    root, lake = cli_lake
    stats = json.loads(imgrec("stats", "--lake", str(lake), "--json").stdout)
    assert stats["images"] == 6
    assert stats["skipped"] == [{"path": str(root / "bad.webp"), "reason": stats["skipped"][0]["reason"]}]
    assert stats["skipped"][0]["reason"]
    assert stats["collections"][0]["images"] == 6


@pytest.mark.parametrize("measure", ["color", "hash", "embedding", "mix"])
def test_search_json(cli_lake: tuple[Path, Path], measure: str) -> None:
    root, lake = cli_lake
    query = sorted(root.rglob("*.png"))[0]
    out = json.loads(imgrec("search", str(query), "--lake", str(lake), "--measure", measure, "--json").stdout)
    assert len(out["results"]) == 5
    first = out["results"][0]
    assert first["path"] == str(query) and set(first) >= {"image_id", "path", "score", "scores"}
    assert {"decode", "features", "candidates", "rerank", "metadata", "total"} <= set(out["timings_ms"])


def test_lake_from_environment_and_rerun_is_a_no_op(cli_lake: tuple[Path, Path]) -> None:
    root, lake = cli_lake
    out = imgrec("ingest", str(root), "--json", env={"IMGREC_LAKE": str(lake)})
    assert json.loads(out.stdout)["processed"] == 0
    text = imgrec("search", "id:1", "id:2", "-k", "3", env={"IMGREC_LAKE": str(lake)}).stdout
    assert "3 results" in text


def test_errors_are_messages_not_tracebacks(tmp_path: Path, cli_lake: tuple[Path, Path]) -> None:
    _, lake = cli_lake
    cases = [
        ("search", str(tmp_path / "nope.jpg"), "--lake", str(lake)),
        ("search", "id:1", "--lake", str(tmp_path / "empty")),
        ("ingest", str(tmp_path / "missing-folder"), "--lake", str(tmp_path / "l2")),
        ("index", "--lake", str(tmp_path / "empty")),
    ]
    for args in cases:
        proc = imgrec(*args, check=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("imgrec: error:") and "Traceback" not in proc.stderr, proc.stderr


def test_a_model_that_cannot_be_had_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """An unknown model name, and a registry model whose weights are not on this machine (torch's cache empty, no
    download: $IMGREC_OFFLINE): one line naming the model, where it looked and how to provide it; exit 2; no lake."""
    photos = tmp_path / "photos"
    make_collection(photos, 2)
    lake = tmp_path / "lake"
    unknown = imgrec("ingest", str(photos), "--lake", str(lake), "--model", "nonsense", check=False)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "unknown model 'nonsense'; choose one of efficientnet-lite0" in unknown.stderr
    cache = tmp_path / "torch"
    missing = imgrec("ingest", str(photos), "--lake", str(lake), "--model", "resnet50", check=False,
                     env={"TORCH_HOME": str(cache), "IMGREC_OFFLINE": "1"})
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("imgrec: error: the resnet50 weights are not on this machine")
    assert str(cache / "hub" / "checkpoints") in missing.stderr and "copy resnet50-" in missing.stderr
    assert not lake.exists()


def test_models_lists_what_is_usable_here_and_the_lakes(tmp_path: Path, cli_lake: tuple[Path, Path]) -> None:
    """`imgrec models`: every model of the registry, whether its weights are on this machine (nothing downloaded),
    where they are or how to provide them; and the model the lake's embeddings were made with."""
    from imgrec.lake import Lake

    _, lake = cli_lake
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    out = json.loads(imgrec("models", "--lake", str(lake), "--json", env=env).stdout)
    rows = {r["name"]: r for r in out["models"]}
    assert {"efficientnet-lite0", "efficientnet-lite2", "resnet50", "convnext_tiny", "vit_b_16"} <= set(rows)
    assert rows["efficientnet-lite0"]["available"] and Path(rows["efficientnet-lite0"]["weights"]).is_file()
    assert not rows["resnet50"]["available"] and str(tmp_path / "torch" / "hub" / "checkpoints") in \
        rows["resnet50"]["missing"]
    assert not (tmp_path / "torch").exists() or not any((tmp_path / "torch").rglob("*.pth"))  # nothing fetched
    recorded = Lake(lake).manifest().model
    assert out["lake_model"]["name"] == "efficientnet-lite0" == recorded["name"]
    assert out["lake_model"]["checksum"] == recorded["checksum"]
    none = json.loads(imgrec("models", "--lake", str(tmp_path / "no_lake"), "--json", env=env).stdout)
    assert none["lake_model"] is None and not (tmp_path / "no_lake").exists()
    text = imgrec("models", "--lake", str(lake), env=env).stdout
    assert "efficientnet-lite0" in text and "embedded with efficientnet-lite0" in text


def test_backend_option_reaches_the_config() -> None:
    from imgrec.cli import _config, build_parser

    args = build_parser().parse_args(["search", "x.jpg", "--backend", "torch", "--lake", "/tmp/nowhere"])
    assert _config(args).backend == "torch"
    args = build_parser().parse_args(["ingest", "/tmp", "--lake", "/tmp/nowhere"])
    assert _config(args).backend == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "x.jpg", "--backend", "tensorflow"])


def test_output_into_a_closed_pipe_ends_quietly(cli_lake: tuple[Path, Path]) -> None:
    """`imgrec stats | head -0`: the reader gone, the command ends with status 0 and no traceback; a broken pipe
    anywhere else (a worker's) is not taken for it (``_stdout_gone``)."""
    _, lake = cli_lake
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything
    try:
        proc = subprocess.run([sys.executable, "-m", "imgrec.cli", "stats", "--json", "--lake", str(lake)],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    check = [sys.executable, "-c", "import sys; from imgrec.cli import _stdout_gone; sys.exit(int(_stdout_gone()))"]
    assert subprocess.run(check, stdout=subprocess.PIPE, timeout=60).returncode == 0  # a reader: not gone
    read, write = os.pipe()
    os.close(read)
    try:
        assert subprocess.run(check, stdout=write, timeout=60).returncode == 1  # no reader: gone
    finally:
        os.close(write)
