"""Shared fixtures: synthetic photos made by the tests, and small lakes built from them."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Ray (tests/test_distributed.py) on the loopback only: with its multi-node switch off, every node, GCS and driver of
# a test cluster takes 127.0.0.1 as its address (else ray.init turns 127.0.0.1 into this machine's outward address);
# read when ray is imported, and inherited by the CLI processes the tests start
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# no test downloads weights (nothing in a test talks to an outside address): a model not on the machine is an error
os.environ.setdefault("IMGREC_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_image(seed: int, size: tuple[int, int] = (192, 144)) -> Image.Image:
    """A distinct, photo-like picture per seed: a two-colour gradient, random shapes, a little blur and noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if seed % 2 else np.linspace(0, 1, h)[:, None, None]
    base = (c0 * (1 - t) + c1 * t) * np.ones((h, w, 1))
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "RGB")


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def app_pages() -> list[tuple[str, str, str]]:
    """app.py's ``PAGES`` (file, title, icon), read without running the app."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "app.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PAGES")
    return ast.literal_eval(node.value)


def make_collection(root: Path, n: int = 10, start: int = 0) -> list[Path]:
    """n synthetic photos in two sub-folders, mixed formats."""
    paths = []
    for i in range(start, start + n):
        sub = "a" if i % 2 == 0 else "b/deeper"
        ext = (".jpg", ".png", ".webp")[i % 3]
        paths.append(save(synthetic_image(i), root / sub / f"img_{i:03d}{ext}"))
    return paths


def ingest_quietly(root: Path, lake: Path, **overrides: object) -> object:
    """Ingest ``root`` into ``lake`` with one worker (unless ``workers`` says otherwise), no progress bar and no log
    (the IngestReport)."""
    from imgrec.config import Config
    from pipelines.ingest import ingest

    return ingest([root], Config.load(lake, **{"workers": 1, **overrides}), progress=False, log=lambda s: None)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imgrec's cache (the ONNX graph of the model) in a folder of this test session, unless $IMGREC_CACHE is set;
    the graph is exported once here, so that the CLI runs the tests start (and kill) find it ready."""
    from imgrec.config import CACHE_ENV, cache_dir

    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("imgrec-cache"))
    from imgrec.features.embed import spec
    from imgrec.features.runtime import ensure_onnx, onnx_available

    if onnx_available():
        ensure_onnx(spec("efficientnet-lite0"))
    return cache_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real images not found at {SHARED} (../shared/data beside the checkout); skipping")
    return SHARED


@pytest.fixture(scope="module", autouse=True)
def _close_app_engines() -> Iterator[None]:
    """Drop the engines the app cached (one per lake, process-wide) once a module is done with its lakes."""
    yield
    ui = sys.modules.get("imgrec.ui")
    if ui is not None:
        ui.open_engine.clear()


@pytest.fixture(autouse=True)
def _no_env_lake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGREC_LAKE", raising=False)
    os.environ.setdefault("TQDM_DISABLE", "1")


class S3Server:
    """A real S3 API server (moto, in its own process) on 127.0.0.1, and the AWS_* settings that point at it."""

    def __init__(self, endpoint: str, proc: object) -> None:
        self.endpoint, self.proc = endpoint, proc
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1"}

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (once); its s3:// URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


def start_s3_server(extra_env: dict[str, str] | None = None) -> S3Server:
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            opener.open(endpoint + "/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the S3 server (moto_server) did not start") from None
            time.sleep(0.2)
    return S3Server(endpoint, proc)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A moto S3 server for the session, its AWS_* settings in this process's environment (and so in the CLI
    processes the tests start) while it runs."""
    server = start_s3_server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.proc.terminate()
        server.proc.wait(10)


def class_picture(hue: tuple[int, int, int], seed: int) -> Image.Image:
    """A class = a colour family; each member has its own shapes and shade."""
    rng = np.random.default_rng(seed)
    base = tuple(int(np.clip(c + rng.integers(-25, 25), 0, 255)) for c in hue)
    img = Image.new("RGB", (160, 120), base)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, 120)), int(rng.integers(0, 80))
        shade = tuple(int(np.clip(c * rng.uniform(0.5, 0.9), 0, 255)) for c in base)
        draw.ellipse((x, y, x + int(rng.integers(15, 40)), y + int(rng.integers(15, 40))), fill=shade)
    return img


RAY_NODE = {"num_cpus": 1, "object_store_memory": 150 * 1024**2, "node_ip_address": "127.0.0.1"}  # one test node


@contextlib.contextmanager
def local_ray_cluster(workers: int = 2) -> Iterator[Any]:
    """A real Ray cluster on 127.0.0.1: a head and ``workers`` worker nodes of 1 CPU each (``RAY_NODE``), this
    process connected to it; shut down afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={**RAY_NODE, "include_dashboard": False})
    for _ in range(workers):
        c.add_node(**RAY_NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
