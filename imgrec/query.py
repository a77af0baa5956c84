"""What a search takes and gives: query images, their features, results and responses, and the errors a person must
act on. ``Featurizer`` turns query images into the features every measure of an index reads: stored ones for images
of the lake, else decoded and computed as at ingestion (the model only where a measure needs it)."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from imgrec.features.embed import spec
from imgrec.features.extract import content_hash, decode_side, extract
from imgrec.lake import LakeError
from imgrec.measures import QueryFeatures, features_on

if TYPE_CHECKING:
    from imgrec.config import Config
    from imgrec.index import IndexSet

UPLOAD_CACHE = 64  # features of the last uploaded images, by content hash
HISTORY = 2000  # searches remembered per engine for the profiling page


class QueryError(ValueError):
    """A query a person must change (bad image, unknown id, too many images, ...). ``kind``: what is wrong, for an
    HTTP status: "too_large", "not_image", "unreadable" (an image's ``ImageError.kind``), "not_found" (an id), or
    "bad_request"."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind


class ModelMismatch(LakeError):
    """The model at hand is not the one the lake's embeddings were made with."""


@dataclass(frozen=True)
class Query:
    """One query image: a file, raw bytes (an upload), or an image already in the lake."""

    path: str | None = None
    data: bytes | None = None
    image_id: int | None = None
    name: str = ""

    @classmethod
    def of(cls, item: Query | str | os.PathLike[str] | bytes | int) -> Query:
        if isinstance(item, Query):
            return item
        if isinstance(item, bool):
            raise QueryError("a query is a file, image bytes or an image id")
        if isinstance(item, int | np.integer):
            return cls(image_id=int(item), name=f"id:{int(item)}")
        if isinstance(item, bytes | bytearray):
            return cls(data=bytes(item), name="upload")
        text = os.fspath(item)
        if text.startswith("id:") and text[3:].isdigit():
            return cls(image_id=int(text[3:]), name=text)
        return cls(path=os.path.abspath(Path(text).expanduser()), name=Path(text).name)


@dataclass
class Result:
    image_id: int
    path: str
    score: float
    scores: dict[str, float]
    rank: int
    collection: str = ""
    relpath: str = ""
    width: int | None = None
    height: int | None = None
    label: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # rank under each single measure, among the candidates
    contributions: dict[str, float] = field(default_factory=dict)  # mix: what each measure added to the score

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float]
    measure: str
    distance: str
    k: int
    candidates: int
    snapshot: int
    queries: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    query_hists: list[NDArray[np.float32]] = field(default_factory=list, repr=False)  # colour of each query image
    query_id: int = 0  # its entry in Engine.history()
    missing: list[str] = field(default_factory=list)  # parts of the collection not searched (a served shard that
    # did not answer in time): the results are from the rest of it

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def to_json(self) -> dict[str, Any]:
        return {
            "results": [r.to_json() for r in self.results], "timings_ms": self.timings_ms,
            "measure": self.measure, "distance": self.distance, "k": self.k, "candidates": self.candidates,
            "snapshot": self.snapshot, "queries": self.queries, "negatives": self.negatives,
            "missing": self.missing,
        }


class Timer:
    """Milliseconds per stage, added up when a stage comes back."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        t = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (t - self._t) * 1000.0, 3)
        self._t = t


class History:
    """The last searches of an engine (the Profiling page reads them): measure, query images, timings per stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._number = 0

    def remember(self, resp: SearchResponse, uploads: int, size: int) -> int:
        """Keep a search; its number (``SearchResponse.query_id``)."""
        with self._lock:
            self._number += 1
            self._entries.append({
                "query_id": self._number, "at": time.time(), "measure": resp.measure, "distance": resp.distance,
                "n_queries": len(resp.queries), "n_negatives": len(resp.negatives), "uploads": uploads,
                "k": resp.k, "results": len(resp.results), "candidates": resp.candidates, "size": size,
                "timings_ms": dict(resp.timings_ms),
            })
            return self._number

    def record_stage(self, query_id: int, stage: str, ms: float) -> None:
        with self._lock:
            for entry in reversed(self._entries):
                if entry["query_id"] == query_id:
                    entry["timings_ms"][stage] = round(float(ms), 3)
                    return

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{**e, "timings_ms": dict(e["timings_ms"])} for e in self._entries]


class Featurizer:
    """Query images -> features, with the features of the last uploads kept by content hash (re-searching the same
    upload with other settings costs nothing). ``embedder``: the lake's model, loaded on first use; ``pool``: the
    threads that decode (and embed) several query images side by side."""

    def __init__(self, config: Config, embedder: Callable[[], Any], pool: Callable[[], ThreadPoolExecutor]) -> None:
        self.config = config
        self._embedder = embedder
        self._pool = pool
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, QueryFeatures] = OrderedDict()

    def features(self, idx: IndexSet, queries: Sequence[Query], known: dict[str, int], need_model: bool,
                 timer: Timer) -> list[QueryFeatures]:
        """Features of each query image, every feature the index holds (the model's only with ``need_model``);
        ``known``: paths of files of the lake, unchanged since ingestion, by image id (their stored features)."""
        from imgrec.imaging import ImageError, read_file

        timer.ms.setdefault("decode", 0.0)  # every response reports every stage, 0 when nothing was decoded
        classes = features_on(idx)
        needed = [cls for cls in classes if need_model or not cls.needs_model]
        hand = {cls.feature for cls in classes if not cls.needs_model}
        model = spec(idx.meta["model"]["name"])
        out: list[QueryFeatures] = []
        todo: list[tuple[int, bytes, str]] = []  # (position, bytes, name) of the images to decode
        for q in queries:
            if q.path in known:  # a file of the lake, unchanged since ingestion: its stored features
                q = Query(image_id=known[q.path], name=q.name)
            if q.image_id is not None:
                try:
                    row = int(idx.rows([q.image_id])[0])
                except KeyError:
                    raise QueryError(f"image id {q.image_id} is not in the lake (removed, or never ingested)",
                                     "not_found") from None
                out.append(QueryFeatures({cls.feature: cls.stored(idx, row) for cls in classes}, q.image_id))
                continue
            data = q.data
            if data is None:
                try:  # a FIFO or device given as a query is refused, not waited on
                    data, _ = read_file(q.path or "", self.config.max_upload_bytes)
                except OSError as exc:
                    raise QueryError(f"cannot read {q.path}: {exc.strerror or exc}") from None
                except ImageError as exc:
                    raise QueryError(f"{q.name}: {exc}", exc.kind) from None
            if len(data) > self.config.max_upload_bytes:
                raise QueryError(f"{q.name}: {len(data) / 1e6:.0f} MB is over the limit of "
                                 f"{self.config.max_upload_bytes / 1e6:.0f} MB", "too_large")
            key = content_hash(data)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None and all(cls.feature in hit.raw for cls in needed):  # the same bytes searched before
                out.append(QueryFeatures({cls.feature: cls.project(idx, hit.raw[cls.feature]) for cls in classes
                                          if cls.feature in hit.raw}, None, key, dict(hit.raw)))
                continue
            out.append(QueryFeatures({}, None, key))
            todo.append((len(out) - 1, data, q.name))

        # ONNX Runtime embeds each image as soon as it is decoded, several at once (a session takes concurrent
        # runs; measured side by side, 5 uploads: 87-98 ms end to end instead of 100-104 for decoding all, then one
        # batch). torch embeds the batch on its own threads.
        embedder = self._embedder() if need_model and todo else None
        each = embedder is not None and getattr(embedder, "backend", "") == "onnx"

        def one(item: tuple[int, bytes, str]) -> tuple[Any, NDArray[np.float32] | None]:
            try:
                f = extract(item[1], model=model if need_model else None, bins=tuple(idx.meta["color_bins"]),
                            thumb_size=None, max_pixels=self.config.max_pixels, min_side=decode_side(model),
                            layout="layout" in hand)
            except ImageError as exc:
                raise QueryError(f"{item[2] or 'query'}: {exc}", exc.kind) from None
            if not each or f.crop is None:
                return f, None
            t = time.perf_counter()
            emb = embedder.embed(f.crop[None])[0][0]
            f.timings["embed"] = time.perf_counter() - t
            return f, emb

        t0 = time.perf_counter()
        if len(todo) > 1:  # several uploads side by side (Pillow, numpy and ONNX Runtime release the GIL)
            done = list(self._pool().map(one, todo))
        else:
            done = [one(item) for item in todo]
        if done:  # the decoding's share of the time the extraction took
            spent = sum(sum(f.timings.values()) for f, _ in done) or 1.0
            wall = (time.perf_counter() - t0) * 1000
            timer.ms["decode"] = round(wall * sum(f.timings["decode"] for f, _ in done) / spent, 3)
        by_feature = {cls.feature: cls for cls in classes}
        crops: list[tuple[int, NDArray[np.uint8]]] = []
        for (pos, _, _), (f, emb) in zip(todo, done, strict=True):
            raw = {name: getattr(f, name) for name in hand if getattr(f, name) is not None}
            if emb is not None:
                raw["emb"] = emb
            elif f.crop is not None:
                crops.append((pos, f.crop))
            self._set(idx, out[pos], raw, by_feature)
        timer.lap("features")
        if crops and embedder is not None:
            emb_batch, _, _ = embedder.embed(np.stack([c for _, c in crops]))
            for j, (pos, _) in enumerate(crops):
                self._set(idx, out[pos], {**out[pos].raw, "emb": emb_batch[j]}, by_feature)
        with self._lock:
            for pos, _, _ in todo:
                f = out[pos]
                self._cache[f.content_hash or ""] = QueryFeatures({}, None, f.content_hash, dict(f.raw))
            while len(self._cache) > UPLOAD_CACHE:
                self._cache.popitem(last=False)
        timer.lap("features")
        timer.ms["features"] = round(max(timer.ms["features"] - timer.ms["decode"], 0.0), 3)
        return out

    @staticmethod
    def _set(idx: IndexSet, f: QueryFeatures, raw: dict[str, Any], classes: dict[str, Any]) -> None:
        """An upload's features as extracted (``raw``) and in the index's space."""
        f.raw = raw
        f.values = {name: classes[name].project(idx, value) for name, value in raw.items() if name in classes}
