"""The HTTP API (``imgrec serve --api``): the engine's search, metadata, thumbnails and files for programs, as
clip-retrieval's "clip back" serves its index. FastAPI over one shared ``Engine`` (thread-safe: requests run in a
thread pool), served by uvicorn.

Private by default: it listens on 127.0.0.1; bound beyond loopback it refuses to start without an API key, which
every request but ``/healthz`` must then carry (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``, compared in
constant time). Request bodies are capped (``max_request_bytes``), each uploaded image by ``Config.max_upload_bytes``
and its declared pixels by ``Config.max_pixels``; uploads are searched in memory, never written anywhere. Paths in
answers are relative to their collection; files are served only from inside their collection's root.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser

from imgrec import access
from imgrec.config import MAX_QUERY_IMAGES
from imgrec.measures import MEASURES
from imgrec.search import Engine, Query, QueryError

MAX_REQUEST_BYTES = 64 * 1024 * 1024
STATUS = {"too_large": 413, "not_image": 415, "unreadable": 422, "not_found": 404, "bad_request": 422}
MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
         "TIFF": "image/tiff"}


class SearchBody(BaseModel):
    """A search by images of the lake (JSON); uploads go as multipart/form-data with the same fields."""

    ids: list[int] = Field(min_length=1, max_length=MAX_QUERY_IMAGES, description="image ids of the lake")
    measure: str = Field("mix", description=f"one of {', '.join(MEASURES)}")
    k: int = Field(5, ge=1, le=1000)
    distance: str | None = None
    threshold: float | None = Field(None, description="range query: every image scoring at least this")
    collections: list[str] | None = None
    folders: list[str] | None = None
    labels: list[str] | None = None
    negative_ids: list[int] = Field(default_factory=list, max_length=MAX_QUERY_IMAGES)
    exclude_query: bool = False


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, whether announced (Content-Length) or
    streamed, before it is all read."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"the request is over the limit of {limit / 1e6:.0f} MB"}, status_code=413)


def create_app(engine: Engine, *, api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The API over ``engine``; ``api_key``: required of every request but ``/healthz`` when set."""
    # uploads are parsed in memory up to the request limit, never spooled to a temporary file
    MultiPartParser.spool_max_size = max_request_bytes
    app = FastAPI(title="imgrec", version="1", docs_url=None, redoc_url=None,
                  description="Content-based image search over an imgrec lake: colour, perceptual hash, deep "
                              "embedding, or all three mixed.")
    cfg = engine.config

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path != "/healthz":
            given = request.headers.get("x-api-key")
            auth = request.headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:]
            if not access.same_secret(given, api_key):
                return JSONResponse({"detail": "a valid API key is needed (X-API-Key header)"}, status_code=401)
        return await call_next(request)

    def result_json(r: Any) -> dict[str, Any]:
        return {"image_id": r.image_id, "score": r.score, "scores": r.scores, "rank": r.rank, "ranks": r.ranks,
                "contributions": r.contributions, "collection": r.collection, "relpath": r.relpath,
                "width": r.width, "height": r.height, "label": r.label,
                "thumbnail_url": f"/thumbnails/{r.image_id}", "file_url": f"/images/{r.image_id}/file"}

    def run_search(queries: list[Any], negatives: list[Any], fields: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = engine.search(queries, measure=fields.get("measure") or "mix", k=int(fields.get("k") or 5),
                                 distance=fields.get("distance") or None, threshold=fields.get("threshold"),
                                 collections=fields.get("collections") or None,
                                 folders=fields.get("folders") or None, labels=fields.get("labels") or None,
                                 exclude_query=bool(fields.get("exclude_query")), negatives=negatives)
        except QueryError as exc:
            raise HTTPException(STATUS.get(exc.kind, 422), str(exc)) from None
        return {"results": [result_json(r) for r in resp.results], "measure": resp.measure,
                "distance": resp.distance, "k": resp.k, "candidates": resp.candidates, "snapshot": resp.snapshot,
                "timings_ms": resp.timings_ms, "missing": resp.missing}

    @app.post("/search", summary="The most similar images to 1 to 5 query images", openapi_extra={
        "requestBody": {"content": {
            "application/json": {"schema": SearchBody.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "negatives": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "measure": {"type": "string"}, "k": {"type": "integer"}, "distance": {"type": "string"},
                "threshold": {"type": "number"}, "collection": {"type": "array", "items": {"type": "string"}},
                "folder": {"type": "array", "items": {"type": "string"}},
                "label": {"type": "array", "items": {"type": "string"}},
                "exclude_query": {"type": "boolean"}}, "required": ["images"]}}}}})
    async def search(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                body = SearchBody.model_validate_json(await request.body())
            except ValueError as exc:
                raise HTTPException(422, f"not a valid search: {exc}") from None
            fields = body.model_dump()
            queries: list[Any] = list(body.ids)
            negatives: list[Any] = list(body.negative_ids)
        elif kind == "multipart/form-data":
            form = await request.form(max_files=2 * MAX_QUERY_IMAGES, max_fields=64)
            images = [f for f in form.getlist("images") if hasattr(f, "read")]
            if not images:
                raise HTTPException(422, "upload 1 to 5 images in the field 'images'")
            queries, negatives = [], []
            for field, into in (("images", queries), ("negatives", negatives)):
                for f in form.getlist(field):
                    if not hasattr(f, "read"):
                        continue
                    data = await f.read()
                    if len(data) > cfg.max_upload_bytes:
                        raise HTTPException(413, f"{f.filename}: {len(data) / 1e6:.0f} MB is over the limit of "
                                                 f"{cfg.max_upload_bytes / 1e6:.0f} MB")
                    into.append(Query(data=data, name=f.filename or "upload"))
            fields = {"measure": form.get("measure"), "k": form.get("k"), "distance": form.get("distance"),
                      "threshold": float(form["threshold"]) if form.get("threshold") else None,
                      "collections": form.getlist("collection"), "folders": form.getlist("folder"),
                      "labels": form.getlist("label"),
                      "exclude_query": str(form.get("exclude_query", "")).lower() in ("1", "true", "yes", "on")}
            try:
                int(fields["k"] or 5)
            except ValueError:
                raise HTTPException(422, "k must be a whole number") from None
        else:
            raise HTTPException(415, "send JSON ({\"ids\": [...]}) or multipart/form-data (files in 'images')")
        return await run_in_threadpool(run_search, queries, negatives, fields)

    @app.get("/images/{image_id}", summary="An image's metadata")
    def image(image_id: int) -> dict[str, Any]:
        from imgrec import browse

        try:
            row = browse.details(engine, image_id)
        except KeyError:
            raise HTTPException(404, f"image id {image_id} is not in the lake") from None
        keep = ("image_id", "collection", "relpath", "file_name", "folder", "size_bytes", "mtime", "width", "height",
                "format", "mode", "content_hash", "ingested_at", "labels", "probs")
        out = {k: row.get(k) for k in keep}
        out["mtime"], out["ingested_at"] = str(out["mtime"]), str(out["ingested_at"])
        out["thumbnail_url"], out["file_url"] = f"/thumbnails/{image_id}", f"/images/{image_id}/file"
        return out

    @app.get("/thumbnails/{image_id}", summary="An image's thumbnail (JPEG, at most 256 px)",
             response_class=Response)
    def thumbnail(image_id: int) -> Response:
        thumb = engine.thumbnails([image_id]).get(image_id)
        if thumb is None:
            raise HTTPException(404, f"no thumbnail for image id {image_id}")
        return Response(thumb, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/images/{image_id}/file", summary="The image's file (only from inside its collection's folder)",
             response_class=Response)
    def file(image_id: int) -> Response:
        from imgrec import browse
        from imgrec.imaging import ImageError

        try:
            data, meta = browse.image_file(engine, image_id)
        except KeyError:
            raise HTTPException(404, f"image id {image_id} is not in the lake") from None
        except PermissionError:
            raise HTTPException(403, "that file is outside its collection's folder: not served") from None
        except (OSError, ImageError) as exc:
            raise HTTPException(410, f"the file cannot be read any more: {exc}") from None
        return Response(data, media_type=MEDIA.get(str(meta.get("format")), "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/stats", summary="Counts per collection, the snapshot and the model")
    def stats() -> dict[str, Any]:
        rows = engine.cursor().execute(
            "SELECT collection, count(*), sum(size_bytes) FROM images GROUP BY collection ORDER BY collection"
        ).fetchall()
        manifest = engine.manifest
        return {"images": engine.size, "snapshot": engine.snapshot,
                "model": (manifest.model.get("name") if manifest else None),
                "collections": [{"collection": c, "images": int(n), "bytes": int(b or 0)} for c, n, b in rows],
                "skipped": int(engine.cursor().execute("SELECT count(*) FROM skipped").fetchone()[0])}

    @app.get("/healthz", summary="Liveness (no key needed)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "snapshot": engine.snapshot}

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> str:
        return _docs_page(app.openapi())

    return _BodyLimit(app, max_request_bytes)


def _docs_page(schema: dict[str, Any]) -> str:
    """The API's reference from its OpenAPI schema, as one HTML page with no outside asset (FastAPI's own pages load
    their scripts from a CDN: a private server sends nothing out)."""
    import html

    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            kinds = ", ".join(op.get("requestBody", {}).get("content", {}))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td>"
                        f"<td>{html.escape(kinds)}</td></tr>")
    return ("<!doctype html><meta charset=utf-8><title>imgrec API</title><style>body{font-family:sans-serif;"
            "margin:2em}td,th{padding:4px 10px;text-align:left;border-bottom:1px solid #ddd}</style>"
            f"<h1>imgrec API</h1><p>{html.escape(schema.get('info', {}).get('description', ''))}</p>"
            "<p>The machine-readable schema: <a href=/openapi.json>/openapi.json</a>.</p><table><tr><th>method</th>"
            "<th>path</th><th>what</th><th>parameters</th><th>body</th></tr>" + "".join(rows) + "</table>"
            f"<pre>{html.escape(json.dumps(SearchBody.model_json_schema(), indent=1))}</pre>")


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_request_bytes: int = MAX_REQUEST_BYTES, log_level: str = "warning") -> None:
    """Run the API with uvicorn until interrupted; refuses to listen beyond loopback without an API key."""
    import uvicorn

    if not access.is_loopback(host) and not api_key:
        raise access.Forbidden(f"listening on {host} (beyond this machine) needs an API key: set "
                               f"${access.API_KEY_ENV} or pass --api-key")
    engine.warm_up()
    uvicorn.run(create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes), host=host, port=port, log_level=log_level,
                access_log=False, server_header=False)
