"""Private by default, viewers who cannot change the lake: the app's listening socket is on loopback and sends no
statistics; in shared mode a viewer sees no lake box and no ingest form, a forged lake choice or admin action is
refused, and the password check takes the same time right or wrong."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ingest_quietly, make_collection

from imgrec import access

ROOT = Path(__file__).resolve().parents[1]


def test_loopback_and_modes() -> None:
    for addr in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert access.is_loopback(addr), addr
    for addr in (None, "", "0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not access.is_loopback(addr), addr
    assert access.mode("127.0.0.1", {}) == "private"
    assert access.mode("0.0.0.0", {}) == "shared" and access.mode(None, {}) == "shared"
    assert access.mode("127.0.0.1", {access.MODE_ENV: "shared"}) == "shared"
    with pytest.raises(ValueError, match="IMGREC_MODE"):
        access.mode("127.0.0.1", {access.MODE_ENV: "public"})


def test_secrets_compare_in_constant_time() -> None:
    secret = "correct horse battery staple"
    assert access.same_secret(secret, secret)
    assert not access.same_secret(secret[:-1] + "X", secret) and not access.same_secret("", secret)
    assert not access.same_secret(secret, None) and not access.same_secret(None, secret)
    tries = {"right": secret, "wrong last": secret[:-1] + "X", "wrong first": "X" + secret[1:], "short": "a",
             "long": secret * 40}

    def batch(given: str) -> float:
        t0 = time.perf_counter()
        for _ in range(200):
            access.same_secret(given, secret)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in tries}
    for _ in range(60):  # interleaved, so a load that comes and goes hits every kind alike
        for k, given in tries.items():
            times[k].append(batch(given))
    med = {k: statistics.median(v) for k, v in times.items()}
    # the long guess hashes more bytes; every guess of a plausible length takes the right one's time
    plausible = [med[k] for k in ("right", "wrong last", "wrong first", "short")]
    assert max(plausible) / min(plausible) < 1.25, med


def _config_options() -> dict[str, object]:
    code = ("from streamlit import config; config.get_config_options(force_reparse=True); "
            "print(config.get_option('server.address'), config.get_option('browser.gatherUsageStats'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    address, stats = out.stdout.split()
    return {"address": address, "stats": stats}


def _listening(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.add(addr if len(addr) == width else addr)
    return found


def test_the_app_listens_on_loopback_only_and_sends_no_statistics(tmp_path: Path) -> None:
    assert _config_options() == {"address": "127.0.0.1", "stats": "False"}
    from test_browser import _free_port, _healthy, _stop

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.fileWatcherType", "none"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "IMGREC_LAKE": str(tmp_path / "lake")})
    try:
        deadline = time.monotonic() + 60
        while not _healthy(f"http://127.0.0.1:{port}/_stcore/health"):
            assert proc.poll() is None and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.25)
        # 0100007F is 127.0.0.1 in /proc/net/tcp; every interface would be 00000000 (or :: in tcp6)
        assert _listening(port) == {"0100007F"}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("access")
    make_collection(base / "photos", 6)
    ingest_quietly(base / "photos", base / "lake")
    make_collection(base / "other", 3, start=50)
    ingest_quietly(base / "other", base / "other_lake")
    return base / "lake"


def _app(page: str, lake: Path, monkeypatch: pytest.MonkeyPatch, mode: str, password: str | None = "s3cret"):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("IMGREC_LAKE", str(lake))
    monkeypatch.setenv(access.MODE_ENV, mode)
    if password:
        monkeypatch.setenv(access.PASSWORD_ENV, password)
    else:
        monkeypatch.delenv(access.PASSWORD_ENV, raising=False)
    return AppTest.from_file(str(ROOT / page), default_timeout=120)


def test_a_viewer_sees_no_lake_box_and_no_ingest_form(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app("pages/2_Collection.py", lake, monkeypatch, "shared").run()
    assert not at.exception
    assert [t.label for t in at.sidebar.text_input] == ["Admin password"]  # no "Lake folder"
    assert not any(b.label == "Start" for b in at.button) and "Folder of images" not in [t.label for t in at.text_input]
    assert any("for the admin" in c.value for c in at.caption)
    private = _app("pages/2_Collection.py", lake, monkeypatch, "private").run()
    assert "Lake folder" in [t.label for t in private.sidebar.text_input]
    assert any(b.label == "Start" for b in private.button)


def test_an_empty_lake_in_shared_mode_offers_the_folder_form_to_the_admin_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first page of an empty lake: a viewer is told that an admin can add a folder, and gets no form; the admin
    password unlocks the form on the same page."""
    empty = tmp_path / "empty_lake"
    at = _app("pages/1_Search.py", empty, monkeypatch, "shared").run()
    assert not at.exception
    assert any("has no images yet: an admin can add a folder" in i.value for i in at.info)
    assert not any(b.label == "Start" for b in at.button)
    assert "collection_folder" not in [t.key for t in at.text_input]
    assert not at.file_uploader  # nothing to search yet
    at.sidebar.text_input[0].input("s3cret").run()
    assert not at.exception
    assert any(b.label == "Start" for b in at.main.button) and at.text_input(key="collection_folder")
    assert any("press **Start**" in i.value for i in at.info)
    assert not empty.exists()  # looking does not create anything


def test_a_forged_lake_choice_is_ignored_and_admin_actions_refused(lake: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from imgrec import ui

    at = _app("pages/2_Collection.py", lake, monkeypatch, "shared")
    at.session_state[ui.CHOSEN_KEY] = str(lake.parent / "other_lake")  # as a forged widget state would set it
    at.run()
    assert not at.exception
    assert f"Collection: {lake.name}" in [c.value for c in at.sidebar.caption]  # still the configured lake
    assert at.sidebar.metric[0].value == "6"

    def action() -> None:
        import streamlit as st

        from imgrec import access, ui

        try:
            ui.require_admin("ingest")
            st.write("allowed")
        except access.Forbidden as exc:
            st.write(f"refused: {exc}")

    from streamlit.testing.v1 import AppTest

    viewer = AppTest.from_function(action).run()
    assert viewer.markdown[0].value == "refused: only an admin can ingest a folder on this shared server"


def test_the_admin_password_unlocks_a_session(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app("pages/2_Collection.py", lake, monkeypatch, "shared").run()
    at.sidebar.text_input[0].input("wrong").run()
    assert any("Wrong password" in e.value for e in at.sidebar.error)
    assert not any(b.label == "Start" for b in at.button)
    at.sidebar.text_input[0].input("s3cret").run()
    assert any(b.label == "Start" for b in at.button)
    assert "Lake folder" in [t.label for t in at.sidebar.text_input]
    from imgrec import ui

    assert at.session_state[ui.PASSWORD_KEY] == ""  # the password is not kept in the session
    no_password = _app("pages/2_Collection.py", lake, monkeypatch, "shared", password=None).run()
    assert not no_password.sidebar.text_input and any("No admin password" in c.value
                                                      for c in no_password.sidebar.caption)


def test_a_viewer_cannot_make_maps(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = "Make the map now (UMAP 2D of the embeddings)"
    viewer = _app("pages/4_Explorer.py", lake, monkeypatch, "shared").run()
    assert not viewer.exception and not any(b.label == label for b in viewer.button)
    admin = _app("pages/4_Explorer.py", lake, monkeypatch, "private").run()
    assert any(b.label == label for b in admin.button)
