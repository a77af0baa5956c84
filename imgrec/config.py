"""The one configuration object shared by the CLI, the pipelines and the app."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_LAKE = Path("data") / "lake"
LAKE_ENV = "IMGREC_LAKE"

MAX_QUERY_IMAGES = 5  # the measures and their distances: imgrec.measures (MEASURES, DISTANCES)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


CACHE_ENV = "IMGREC_CACHE"
SHARD_ADDRESS_ENV = "IMGREC_SHARD_ADDRESS"


def cache_dir() -> Path:
    """Where imgrec keeps what it can make again (the ONNX graphs of the models, downloaded index files):
    ``$IMGREC_CACHE``, else ``$XDG_CACHE_HOME/imgrec``, else ``~/.cache/imgrec``."""
    chosen = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgrec"
    return Path(chosen).expanduser()


Location = Path | str  # a local folder (Path), or an object-storage URL (str: s3://bucket/prefix)


def resolve_lake(lake: str | os.PathLike[str] | None = None) -> Location:
    """`--lake` if given, else `$IMGREC_LAKE`, else `data/lake` (relative to the working directory): an absolute
    Path, or an ``s3://bucket/prefix`` URL as it is (no trailing slash)."""
    chosen = lake if lake not in (None, "") else os.environ.get(LAKE_ENV) or DEFAULT_LAKE
    if str(chosen).startswith("s3://"):
        return str(chosen).rstrip("/")
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Config:
    """Every tunable of imgrec in one place; `Config.load()` applies the lake resolution rule."""

    lake: Location = field(default_factory=resolve_lake)
    # embedding model
    model: str = "efficientnet-lite0"
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    backend: str = "auto"  # what runs the model: "onnx" (ONNX Runtime, CPU), "torch", or "auto": torch on a GPU,
    # else ONNX Runtime where installed (imgrec.features.runtime)
    batch_size: int = 32
    query_threads: int = 1  # torch threads for embedding query images on the CPU: with the cores busy elsewhere,
    # torch's spinning threads made one upload take 950 ms instead of 15-20 ms (ONNX Runtime runs each query image on
    # one thread, several images side by side)
    # ingestion
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    embed_threads: int = 0  # torch threads for embedding at ingestion on the CPU (0: the cores the decoding
    # workers leave while they run, then 1 or every core, whichever measures faster)
    commit_every: int = 512  # images per atomic commit (what a kill -9 can lose at most)
    engine: str = "local"  # "local": worker processes on this machine; "ray": a Ray Data job (pipelines.distributed)
    ray_address: str = ""  # the Ray cluster to run on ("auto", "HOST:6379"; empty: a local instance, started and stopped)
    embed_actors: int = 0  # Ray: embedding actors (split; 0: one per GPU) or tasks at a time (fused; 0: one a CPU)
    ray_files_per_task: int = 64  # files a Ray task reads (fewer when the run is small, so every CPU gets 4)
    ray_stages: str = "auto"  # "fused": each Ray task decodes and embeds; "split": CPU tasks decode, actors embed;
    # "auto": split where the cluster has GPUs, else fused (pipelines.distributed.plan_pools)
    thumb_size: int = 256
    max_pixels: int = 180_000_000  # larger declared images are refused (decompression bombs)
    max_upload_bytes: int = 50 * 1024 * 1024
    max_file_bytes: int = 1024**3  # larger files are not read at ingestion (a video or disk image named .jpg)
    file_timeout_s: float = 300.0  # a worker process decoding one file longer than this is stopped and replaced
    # colour histogram: HSV bins (hue, saturation, value)
    color_bins: tuple[int, int, int] = (8, 4, 4)
    # embedding space, made at index time (tuned on Corel-1k and Flowers-17: docs/relevance.md)
    embedding_dims: int = 128  # PCA-whitened dimensions kept (0: the model's vectors as they are)
    whiten_power: float = 0.25  # each principal axis scaled by eigenvalue ** -power (0.5 = full whitening)
    space_min_images: int = 1000  # smaller lakes keep the model's vectors: too few images to fit the space on
    dba_k: int = 8  # database-side augmentation: each image averaged with its k nearest (itself first); 0: off
    # colour layout space (the colour measure's default distance, imgrec.features.color.layout_descriptor): PCA to
    # these dimensions, no whitening, then the same augmentation; chosen held-out (docs/relevance.md)
    layout_dims: int = 128
    layout_power: float = 0.0
    layout_dba_k: int = 8
    # search
    expand_k: int = 5  # alpha query expansion: the embedding query plus its k nearest images (0: off)
    expand_alpha: float = 3.0
    expand_ef: int = 64  # graph search breadth for the expansion's few neighbours (400k: recall@6 0.985 vs 0.993
    # at 256, 3.5x faster)
    candidates: int = 128  # per query image and measure, before the exact re-rank
    hnsw_connectivity: int = 16
    hnsw_expansion_add: int = 64  # 100k images: recall@10 0.992 (128: 0.999) for half the build time
    hnsw_expansion_search: int = 256
    index_shards: int = 0  # graphs dealt to this many shards (imgrec.searchers); 0: as the current index (1 if none)
    shard_address: str = field(default_factory=lambda: os.environ.get(SHARD_ADDRESS_ENV, ""))  # a Ray cluster
    # whose actors serve the index's shards (imgrec.shard_actors; started there if absent); empty: this process
    shard_timeout_s: float = 10.0  # a served shard not answering within this is left out, and the result says so
    search_threads: int = 0  # threads for a batch of graph searches (several query images; 0: every core)
    exact_filter_limit: int = 200_000  # filtered searches over at most this many images are exact scans
    mix_weights: tuple[tuple[str, float], ...] = (("embedding", 0.85), ("color", 0.05), ("hash", 0.3))  # relevance.md
    mix_fusion: str = "gated"  # imgrec.similarity.FUSIONS; chosen held-out (docs/relevance.md)
    mix_gate_floor: float = 0.2  # gated: colour's weight is 0 up to this colour-content agreement of the collection
    near_duplicate_bits: int = 24  # mix: the hash scores 0 beyond this Hamming distance (of 128 bits; 12 of 64)
    near_candidate_bits: int = 16  # mix: the hash's own candidates are those within this (the radius table: 1.2 ms
    # at 400k, 6.1 ms at 24 bits); copies between the two are found by the embedding and colour candidates
    softmin_tau: float = 0.05  # temperature of the multi-image soft minimum

    @classmethod
    def load(cls, lake: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
        return cls(lake=resolve_lake(lake), **overrides)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """Every field as JSON (for a job in a child process: ``from_json`` gives this object back)."""
        import json
        from dataclasses import asdict

        return json.dumps({**asdict(self), "lake": str(self.lake)})

    @classmethod
    def from_json(cls, text: str) -> Config:
        import json

        values = json.loads(text)
        lake = values.pop("lake")
        values["color_bins"] = tuple(values["color_bins"])
        values["mix_weights"] = tuple((m, float(w)) for m, w in values["mix_weights"])
        return cls(lake=resolve_lake(lake), **values)

    def with_(self, **changes: object) -> Config:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.mix_weights)
