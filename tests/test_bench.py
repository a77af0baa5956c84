"""`imgrec bench` on a tiny lake of generated images: the report's structure and sanity, never its timings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ingest_quietly, make_collection

from imgrec.bench.runner import BenchOptions, cache_sizes, cpu_identity, parse_sizes, run, vector_extensions
from imgrec.measures import MEASURES

N = 300


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    photos = tmp_path_factory.mktemp("photos")
    make_collection(photos, 24)
    lake = tmp_path_factory.mktemp("source") / "lake"
    ingest_quietly(photos, lake)
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    opts = BenchOptions(quick=True, sizes=[N], out=out, source_lake=lake, work=work, queries1=4, queries5=2,
                        e2e1=2, e2e5=1, cold_runs=1, ingest_limit=6, ingest_roots=[("photos", photos)],
                        verbose=False)
    return {"report": run(opts), "out": out, "work": work, "lake": lake}


def test_search_stage_has_latency_exact_ratio_and_recall(bench: dict[str, Any]) -> None:
    report = bench["report"]
    assert report["errors"] == []
    (entry,) = report["search"]
    assert entry["n"] == N and entry["synth"]["n"] == N and entry["index"]["bytes"] > 0
    assert entry["index"]["seconds"] > 0 and entry["synth"]["perturbed_rows"] == N - 24
    seen = {(r["measure"], r["images"]) for r in entry["runs"]}
    assert seen == {(m, i) for m in MEASURES for i in (1, 5)}
    for r in entry["runs"]:
        assert r["queries"] > 0 and r["total_ms"]["p50"] > 0 and r["wall_ms"]["p95"] >= r["wall_ms"]["p50"] > 0
        assert r["exact_ms"]["p50"] > 0 and r["speedup_p50"] > 0
        assert 0.0 <= r["recall_min"] <= r["recall"] <= 1.0
        if r["measure"] != "mix" and (r["variant"] == "no_expand" or r["measure"] not in ("embedding", "color")):
            assert r["numpy_agreement"] == 1.0, r  # numpy brute force finds the engine's exact top 10
    emb = [r for r in entry["runs"] if r["measure"] == "embedding" and r["images"] == 1]
    assert all(r["recall"] >= 0.9 for r in emb)  # 300 images: the graph search is all but exhaustive
    mem = entry["memory_mb"]
    assert 0 < mem["open"]["rss"] <= mem["exact"]["peak"] and mem["searched"]["file"] > 0


def test_end_to_end_cold_start_and_ingestion(bench: dict[str, Any]) -> None:
    report = bench["report"]
    (e2e,) = report["e2e"]
    assert {(r["measure"], r["images"]) for r in e2e["rows"]} == {(m, i) for m in MEASURES for i in (1, 5)}
    for r in e2e["rows"]:
        assert r["wall_ms"]["p50"] >= r["engine_ms"]["p50"] > 0
        assert {"decode", "features", "candidates", "thumbnails"} <= set(r["stages_p50_ms"])
    cold = report["cold_start"]
    assert cold["n"] == N and cold["photo"]["total_ms"]["p50"] > 0 and cold["photo"]["needs_model"]
    assert {"imports", "model_load", "first_search"} <= set(cold["photo"]["parts_p50_ms"])
    assert [i["workers"] for i in report["ingestion"]] == [1, 2]
    for i in report["ingestion"]:
        assert i["images"] == 6 and i["images_per_s"] > 0 and i["steady_images_per_s"] > 0
        assert {"decode", "color", "hash", "thumbnail", "embed", "write"} <= set(i["ms_per_image"])


def test_targets_and_files(bench: dict[str, Any]) -> None:
    report, out = bench["report"], bench["out"]
    targets = report["targets"]
    names = " ".join(t["figure"] for t in targets)
    for part in ("search stage p50, 1 image", "5 images", "embedding recall@10", "end to end", "cold start",
                 "ingestion", "RSS", "index build"):
        assert part in names
    assert all(t["status"] in ("pass", "FAIL", "n/a") and "400,000" in t["where"] for t in targets
               if t["n"] is not None)
    assert report["files"] == [str(out / f"bench-quick-{N}.json"), str(out / f"bench-quick-{N}.md")]
    saved = json.loads((out / f"bench-quick-{N}.json").read_text())
    assert saved["targets"] == json.loads(json.dumps(targets))
    md = (out / f"bench-quick-{N}.md").read_text()
    for heading in ("## Targets", "## Search stage", "## End to end, warm", "## Cold start", "## Ingestion"):
        assert heading in md
    assert "exact p50 ms" in md and "speed-up" in md


def test_synthetic_lake_is_cached_and_complete(bench: dict[str, Any]) -> None:
    from imgrec.bench.synth import synthesize

    work = bench["work"]
    assert not list(work.glob("*.tmp-*"))  # nothing half-made left behind
    again = synthesize(bench["lake"], N, work, log=lambda s: None)
    assert again["cached"] and again["n"] == N
    assert json.loads((Path(again["lake"]) / "bench.json").read_text())["index"]["fingerprint"]


def test_perturbed_rows_keep_the_shape_of_real_features(bench: dict[str, Any]) -> None:
    from imgrec.bench.synth import make_rows, noise_basis, read_source

    src = read_source(bench["lake"])
    perm = np.arange(src.n)
    basis = noise_basis(src.emb)
    srow, E, H, X, _ = make_rows(src, perm, 0, 3 * src.n, basis, 0.5, seed=0)
    again = make_rows(src, perm, 0, 3 * src.n, basis, 0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((srow, E, H, X), again[:4], strict=True))  # deterministic
    assert np.array_equal(E[: src.n], src.emb) and np.array_equal(X[: src.n], src.hashes)  # first pass: real
    assert np.allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-4) and np.allclose(H.sum(axis=1), 1.0, atol=1e-4)
    cos = np.einsum("ij,ij->i", E[src.n:], src.emb[srow[src.n:]])
    assert 0.7 < float(cos.mean()) < 0.99  # a perturbed copy, not a duplicate and not noise
    bits = np.bitwise_count(X[src.n:] ^ src.hashes[srow[src.n:]]).sum(axis=1)
    assert bits.max() <= 8 and bits.mean() > 0


def test_cli_options() -> None:
    from imgrec.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--sizes", "10k,100k", "--skip", "ingest", "--json"])
    assert args.quick and args.sizes == "10k,100k" and args.skip == ["ingest"] and args.json
    assert args.func.__name__ == "cmd_bench"


def test_parse_sizes() -> None:
    assert parse_sizes("10000,100k,0.4M, 1M") == [10_000, 100_000, 400_000, 1_000_000]
    with pytest.raises(ValueError):
        parse_sizes("0")
    assert math.isclose(parse_sizes("2.5k")[0], 2500)


def test_the_cpu_is_told_apart_by_family_caches_and_vector_extensions(tmp_path: Path) -> None:
    """Two virtual CPUs both named "AMD EPYC": the report tells the AVX2-only one from the one with AVX-512."""
    for level, kind, size in ((1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                              (3, "Unified", "32768K")):
        d = tmp_path / f"index{level}{kind[0]}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    caches = cache_sizes(tmp_path)
    assert caches == {"L2": "1024K", "L3": "32768K"}
    info = ["processor\t: 0", "vendor_id\t: AuthenticAMD", "cpu family\t: 26", "model\t\t: 2",
            "model name\t: AMD EPYC", "", "processor\t: 1", "cpu family\t: 25", "model\t\t: 1"]
    assert cpu_identity(info, caches) == "family 26 model 2, L2 1024K, L3 32768K"
    assert cpu_identity([], {}) is None and cache_sizes(tmp_path / "absent") == {}
    zen3 = "fpu sse2 avx avx2 fma bmi2".split()
    zen5 = zen3 + "avx512f avx512_vnni avx512_bf16 avx_vnni".split()
    assert vector_extensions(zen3) == ["AVX2", "FMA"]
    assert vector_extensions(zen5) == ["AVX2", "FMA", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AVX-VNNI"]
