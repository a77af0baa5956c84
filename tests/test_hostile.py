"""Odd and hostile files (tests/hostile.py): one ingestion over all of them never stops, every readable image is
ingested upright with the right colours and size, every other file is recorded with a clear reason; the same files
as uploads give results or a clear message, never a traceback. Files that vanish or change between the walk and the
read, or while they are read, are handled too. Real files, a real ingestion, real DuckDB / Parquet / usearch."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import make_collection, save, synthetic_image
from hostile import AS_ROOT, Kind, encode, make_corpus, quadrants, restore_permissions, uploads
from PIL import Image

from imgrec.config import Config
from imgrec.imaging import ImageError, read_file
from imgrec.lake import Lake
from pipelines.ingest import IngestReport, ingest
from pipelines.walk import printable_name, walk

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, list[Kind], IngestReport]]:
    base = tmp_path_factory.mktemp("hostile")
    folder = base / "corpus"
    kinds = make_corpus(folder, outside=base / "elsewhere")
    lake = base / "lake"
    t0 = time.perf_counter()
    report = ingest([folder], Config.load(lake, workers=2, commit_every=8), progress=False, log=lambda s: None)
    report.seconds = time.perf_counter() - t0
    yield folder, lake, kinds, report
    restore_permissions(folder)
    from imgrec import ui

    ui.open_engine.clear()


def _tables(lake: Path) -> tuple[dict[str, dict], dict[str, str]]:
    conn = Lake(lake).connect()
    try:
        images = {r["relpath"]: r for r in conn.frame(
            "SELECT i.*, t.thumb FROM images i JOIN thumbnails t USING (image_id)").iter_rows(named=True)}
        skipped = dict(conn.sql("SELECT relpath, reason FROM skipped"))
    finally:
        conn.close()
    return images, skipped


def test_corpus_has_at_least_25_kinds(corpus: tuple[Path, Path, list[Kind], IngestReport]) -> None:
    _, _, kinds, report = corpus
    assert len(kinds) >= 25
    assert len({k.name for k in kinds}) == len(kinds)
    assert not report.interrupted and report.processed > 0  # the run went through to the end


def test_every_kind_has_its_outcome(corpus: tuple[Path, Path, list[Kind], IngestReport]) -> None:
    _, lake, kinds, _ = corpus
    images, skipped = _tables(lake)
    failures = []
    for kind in kinds:
        for rel in kind.files:
            rel = printable_name(rel)
            if kind.outcome == "ingested":
                row = images.get(rel)
                if row is None:
                    failures.append(f"{kind.name}: {rel!r} not ingested ({skipped.get(rel)})")
                    continue
                if kind.size and (row["width"], row["height"]) != kind.size:
                    failures.append(f"{kind.name}: {rel!r} is {row['width']}x{row['height']}, not {kind.size}")
                if kind.expect_format and row["format"] != kind.expect_format:
                    failures.append(f"{kind.name}: {rel!r} format {row['format']}")
                thumb = np.asarray(Image.open(io.BytesIO(row["thumb"])).convert("RGB"), dtype=np.int16)
                h, w = thumb.shape[:2]
                for (fx, fy), rgb in kind.colours:
                    got = thumb[min(h - 1, int(fy * h)), min(w - 1, int(fx * w))]
                    if np.abs(got - np.array(rgb)).max() > 40:
                        failures.append(f"{kind.name}: {rel!r} at ({fx}, {fy}) shows {tuple(got)}, not {rgb}")
            elif kind.outcome == "skipped":
                if rel in images:
                    failures.append(f"{kind.name}: {rel!r} was ingested")
                elif rel not in skipped or not re.search(kind.reason, skipped[rel] or ""):
                    failures.append(f"{kind.name}: {rel!r} reason {skipped.get(rel)!r} !~ {kind.reason!r}")
            else:
                if rel in images or rel in skipped:
                    failures.append(f"{kind.name}: {rel!r} should be left out")
    assert not failures, "\n".join(failures)


def test_rerun_over_the_corpus_changes_nothing(corpus: tuple[Path, Path, list[Kind], IngestReport]) -> None:
    folder, lake, _, _ = corpus
    before = Lake(lake).snapshot()
    report = ingest([folder], Config.load(lake, workers=2), progress=False, log=lambda s: None)
    assert (report.processed, report.relinked, report.removed, report.skipped) == (0, 0, 0, 0)
    assert Lake(lake).snapshot() == before  # known bad files are not recorded again: no commit, no new index


def test_corpus_is_searchable_and_names_print_on_one_line(corpus: tuple[Path, Path, list[Kind], IngestReport],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from imgrec import cli
    from imgrec.search import Engine

    _, lake, _, _ = corpus
    engine = Engine(Config.load(lake))
    (image_id,) = engine.cursor().execute("SELECT image_id FROM images WHERE relpath = ?",
                                          ["names/line\nbreak.jpg"]).fetchone()
    resp = engine.search([image_id], measure="mix", k=50)
    mine = next(r for r in resp.results if r.image_id == image_id)  # among exact copies, all at 1.0
    assert mine.score == pytest.approx(1.0, abs=1e-3) and mine.path.endswith("names/line\nbreak.jpg")
    assert cli.main(["search", f"id:{image_id}", "--lake", str(lake), "-k", "50", "--measure", "hash"]) == 0
    out = capsys.readouterr().out
    assert "line\\nbreak.jpg" in out and "line\nbreak" not in out  # one result per line
    assert cli.main(["stats", "--lake", str(lake), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert any("bad-\\xff\\xfe-name.jpg" in s["path"] for s in stats["skipped"])


def test_uploads_of_the_corpus_give_results_or_a_clear_reason(corpus: tuple[Path, Path, list[Kind], IngestReport]
                                                              ) -> None:
    from imgrec import ui
    from imgrec.search import Engine, QueryError

    folder, lake, kinds, _ = corpus
    engine = Engine(Config.load(lake))
    files_before = sorted(p for p in folder.rglob("*") if not p.is_symlink() and p.is_file()
                          and not p.name.startswith("socket"))
    tried = 0
    for kind, name, data in uploads(folder, kinds):
        tried += 1
        if kind.outcome == "ingested":
            resp = ui.run_search(engine, [(name, data)], [], "mix", 3)
            assert len(resp.results) == 3, name
            assert ui.query_thumbnail(data) is not None
        else:
            with pytest.raises(QueryError) as err:  # noqa: PT012
                ui.run_search(engine, [(name, data)], [], "mix", 3)
                pytest.fail(f"{kind.name}: {name} gave results")
            assert name in str(err.value) and re.search(kind.reason, str(err.value)), str(err.value)
            assert ui.query_thumbnail(data) is None
    assert tried >= 40
    with pytest.raises(QueryError, match="over the limit of 52 MB"):
        ui.run_search(engine, [("big.jpg", b"\xff\xd8" + bytes(engine.config.max_upload_bytes))], [])
    files_after = sorted(p for p in folder.rglob("*") if not p.is_symlink() and p.is_file()
                         and not p.name.startswith("socket"))
    assert files_after == files_before  # uploads are never written anywhere


def test_app_uploads_of_the_corpus(corpus: tuple[Path, Path, list[Kind], IngestReport],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every uploadable file of the corpus through the Search page, 5 at a time: each bad one is flagged under its
    preview, and Search gives results or one clear error naming the first bad file; never an exception."""
    from streamlit.testing.v1 import AppTest

    folder, lake, kinds, _ = corpus
    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    at = AppTest.from_file(ROOT / "pages" / "1_Search.py", default_timeout=90).run()
    assert not at.exception
    files = uploads(folder, kinds)
    for start in range(0, len(files), 5):
        chunk = files[start:start + 5]
        at.file_uploader(key="uploads").set_value([(name, data, "image/jpeg") for _, name, data in chunk]).run()
        assert not at.exception
        unreadable = " ".join(c.value for c in at.caption if "(cannot be read)" in c.value)  # one line for them
        for kind, name, _ in chunk:
            assert (f"{name} (cannot be read)" in unreadable) == (kind.outcome != "ingested"), name
        next(b for b in at.button if b.label == "Search").click().run()
        assert not at.exception
        bad = [name for kind, name, _ in chunk if kind.outcome != "ingested"]
        if bad:
            (error,) = at.error
            assert error.value.startswith(f"Cannot search: {bad[0]}: "), error.value
        else:
            assert not at.error and any(str(m.value).startswith("**#1 · ") for m in at.markdown)


# --- files that change under the ingestion --------------------------------------------------------------------------


def test_files_vanishing_or_changing_between_walk_and_read(tmp_path: Path) -> None:
    root, lake = tmp_path / "photos", tmp_path / "lake"
    make_collection(root, 2)  # a/img_000.jpg, b/deeper/img_001.png
    save(synthetic_image(10), root / "c_vanish.jpg")
    save(synthetic_image(11), root / "d_change.jpg")
    save(synthetic_image(12), root / "e_fifo.jpg")
    replacement = encode(synthetic_image(13, (320, 240)), "PNG")

    def meddle(done: int, total: int) -> None:  # runs after the first file, before the next ones are read
        if done == 1:
            (root / "c_vanish.jpg").unlink()
            (root / "d_change.jpg").write_bytes(replacement)
            (root / "e_fifo.jpg").unlink()
            os.mkfifo(root / "e_fifo.jpg")  # a FIFO in a file's place: opening it to read would block forever

    cfg = Config.load(lake, workers=1)
    report = ingest([root], cfg, progress=False, build_index=False, on_progress=meddle, log=lambda s: None)
    assert not report.interrupted
    images, skipped = _tables(lake)
    assert "cannot read file: No such file" in skipped["c_vanish.jpg"]
    assert "not a regular file" in skipped["e_fifo.jpg"]
    changed = images["d_change.jpg"]
    # the record describes the bytes that were read: their size, hash and dimensions
    assert (changed["size_bytes"], changed["width"], changed["height"]) == (len(replacement), 320, 240)
    assert changed["mtime_ns"] == (root / "d_change.jpg").stat().st_mtime_ns
    again = ingest([root], cfg, progress=False, build_index=False, log=lambda s: None)
    assert (again.processed, again.relinked) == (0, 0)  # consistent: nothing to re-read
    (root / "e_fifo.jpg").unlink()
    again = ingest([root], cfg, progress=False, build_index=False, log=lambda s: None)
    assert "e_fifo.jpg" not in _tables(lake)[1]  # gone: its record is cleared


def test_a_file_written_while_it_is_read_is_refused_or_read_whole(tmp_path: Path) -> None:
    """A file rewritten over and over as a copy or a camera import writes it (truncate, then chunk after chunk) while
    it is read: each read is refused ("changed while it was being read"), or gives one version whole, or a prefix of
    one (the file as it stood between two chunks: consistent, and the decoder reports it as truncated; its size
    changes, so the next run reads it again). Never a mix of two versions."""
    path = tmp_path / "busy.png"
    versions = [encode(Image.fromarray(np.random.default_rng(i).integers(0, 256, (400 + 50 * i, 600, 3), np.uint8)),
                       "PNG") for i in range(2)]
    chunks = (65_536, 47_123)  # sizes of the two versions' prefixes never coincide mid-copy
    path.write_bytes(versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            data, chunk = versions[i % 2], chunks[i % 2]
            with open(path, "wb") as fh:  # O_TRUNC, then the bytes chunk by chunk
                for at in range(0, len(data), chunk):
                    fh.write(data[at:at + chunk])
                    fh.flush()
                    time.sleep(0.0003)
            time.sleep(0.003)

    thread = threading.Thread(target=writer)
    thread.start()
    whole = partial = refused = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                data, st = read_file(path)
            except ImageError as exc:
                assert "changed while it was being read" in str(exc)
                refused += 1
                continue
            assert len(data) == st.st_size
            if data in versions:
                whole += 1
            else:
                assert any(v.startswith(data) for v in versions), "a mix of two versions was read"
                partial += 1
    finally:
        stop.set()
        thread.join()
    assert refused > 0 and whole + partial > 0  # the race was real
    assert read_file(path)[0] in versions


def test_permission_denied_file_is_skipped(tmp_path: Path) -> None:
    if AS_ROOT:
        pytest.skip("running as root: every file is readable (the FIFO, socket and link kinds cover unreadable "
                    "entries as root)")
    root = tmp_path / "photos"
    make_collection(root, 1)
    locked = save(synthetic_image(3), root / "locked.jpg")
    os.chmod(locked, 0)
    try:
        errors: list[tuple[str, str]] = []
        assert len(list(walk(root, errors))) == 2
        report = ingest([root], Config.load(tmp_path / "lake", workers=1), progress=False, build_index=False,
                        log=lambda s: None)
        assert report.skipped == 1
        assert "Permission denied" in _tables(tmp_path / "lake")[1]["locked.jpg"]
    finally:
        os.chmod(locked, 0o644)


def test_quadrant_helper_is_what_the_checks_assume() -> None:
    a = quadrants()
    assert a.shape == (64, 96, 3) and tuple(a[0, 0]) == (220, 30, 30) and tuple(a[-1, -1]) == (240, 220, 40)
