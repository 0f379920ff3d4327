"""A web page and an HTTP API that segment an uploaded image with one loaded model (FastAPI).

``create_app(predictor)`` builds the app; ``densepred serve --checkpoint CKPT`` runs it with uvicorn.
Uploads are untrusted, so each limit is enforced before the work it protects: the body size while
the body streams in, the file type from its first bytes, the pixel count from the image header
before any pixel is decoded, the memory its inference needs from that pixel count
(:mod:`densepred.admission`) against the server's memory budget: a large image runs by sliding
window, one that cannot fit is refused with 413, one that must wait for memory gets 503.
Inference runs on a small thread pool; a bounded number of requests may wait for it and the
rest are refused at once with 503 instead of queueing without limit. Slow clients time out
(headers, body), and inference stops at the next layer when its client leaves or its deadline
passes (504).
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from .admission import (
    Cancellation,
    Cancelled,
    MemoryBudget,
    MemoryPlanner,
    Plan,
    available_memory,
    cancellable_forward,
    kept_memory,
    return_free_memory,
)
from .data.errors import DataError
from .data.io import read_image
from .footprint import meta_model
from .prediction import Predictor, save_index_png
from .streams import Lanes

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_PIXELS",
    "MEMORY_SHARE",
    "InferencePool",
    "http_protocol",
    "create_app",
    "index_png",
    "running_server",
    "sniff_format",
]

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# 25 Mpx (5000 x 5000): whole-image inference holds several float maps of this size per request.
MAX_PIXELS = 25_000_000
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers around the file itself
MEMORY_SHARE = 0.5  # default budget: this share of the memory available when the server starts

# The formats read_image handles (PIL's names) and how each file starts.
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".ppm"}
_ACCEPTED = "PNG, JPEG, BMP, TIFF, WebP or PPM/PGM"

T = TypeVar("T")
_log = logging.getLogger("uvicorn.error")  # uvicorn's own startup lines, where the server prints them


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's signature (its first bytes), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    return None


class InferencePool:
    """``workers`` inference threads, and room for at most ``queue_size`` more requests waiting.

    A request is admitted for its whole life (upload, wait, inference), so the pool also bounds
    how many uploads are held in memory at once.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError(f"need workers >= 1 and queue_size >= 0, got {workers} and {queue_size}")
        self.workers, self.capacity = workers, workers + queue_size
        self._admitted = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # started on first use, so an app can be served again

    @property
    def admitted(self) -> int:
        return self._admitted

    def admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.capacity:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="densepred-infer")
            future = self._executor.submit(fn, *args)
        # wrap_future cancels a job still waiting when its client leaves, so it frees its place.
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Upload:
    data: bytes
    name: str
    content_type: str


def _too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(
        413, f"upload of {size:,}+ bytes exceeds this server's limit of {limit:,} bytes; send a smaller image"
    )


async def _read_upload(request: Request, max_bytes: int, read_timeout_s: float) -> _Upload:
    """The multipart field ``image``, refused with 413 as soon as the body is known to be too large
    and with 408 when the client sends nothing for ``read_timeout_s`` seconds."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"send multipart/form-data with the image in the field 'image' (got {ctype!r})")
    body_limit = max_bytes + _FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise _too_large(int(declared), max_bytes)
    received = 0

    async def receive() -> dict:
        # Count while streaming: a chunked body (no Content-Length) is cut off at the limit too.
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), read_timeout_s)
        except TimeoutError:
            raise HTTPException(408, f"the upload stalled: no data for {read_timeout_s:g} s") from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > body_limit:
                raise _too_large(received, max_bytes)
        return message

    form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
    try:
        item = form.get("image")
        if not isinstance(item, UploadFile):
            raise HTTPException(422, "no file in the form field 'image'; send the image as image=@file.png")
        data = await item.read()
        name = Path(item.filename or "upload").name[:120]
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes)
        return _Upload(data, name, (item.content_type or "").split(";")[0].strip().lower())
    finally:
        await form.close()


def _check_type(upload: _Upload) -> str:
    """The upload's format from its signature; 415 unless both it and the declared type are an image's."""
    if not upload.data:
        raise HTTPException(400, f"{upload.name}: the file is empty")
    # Browsers send application/octet-stream (or nothing) for a file type they do not know.
    if upload.content_type and not (
        upload.content_type.startswith("image/") or upload.content_type == "application/octet-stream"
    ):
        raise HTTPException(415, f"{upload.name}: {upload.content_type} is not an image type; upload {_ACCEPTED}")
    kind = sniff_format(upload.data)
    if kind is None:
        raise HTTPException(415, f"{upload.name}: the content is not a {_ACCEPTED} file (unknown file signature)")
    return kind


def _check_header(upload: _Upload, kind: str, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` from the header alone (PIL decodes nothing in ``open``); 413 when too many pixels."""
    try:
        with Image.open(io.BytesIO(upload.data), formats=[kind]) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{upload.name}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise HTTPException(400, f"{upload.name}: unreadable {kind} header ({e})") from None
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"{upload.name}: {width}x{height} = {width * height:,} pixels exceeds this server's limit of "
            f"{max_pixels:,} pixels; downscale the image",
        )
    return width, height


def _segment_upload(
    lanes: Lanes[Predictor], upload: _Upload, kind: str, max_pixels: int, plan: Plan, token: Cancellation
) -> tuple[np.ndarray, float]:
    """Decode and segment as ``plan`` says (in a worker thread, on the lane ``lanes`` gives it):
    class ids ``(H, W)`` and the inference time in ms; :class:`Cancelled` when ``token`` is
    cancelled meanwhile."""
    predictor = lanes.own
    # read_image takes a path; decoding through it keeps the server identical to `densepred predict`.
    with tempfile.TemporaryDirectory(prefix="densepred-serve-") as tmp:
        path = Path(tmp) / f"upload{_SUFFIXES[kind]}"
        path.write_bytes(upload.data)
        try:
            image = read_image(path, channels=predictor.trained.in_channels, max_pixels=max_pixels)
        except DataError as e:
            raise HTTPException(400, str(e).replace(str(path), upload.name)) from None
    start, size = time.perf_counter(), image.shape[:2]
    try:
        with token.active(), lanes.take() as lane:
            labels = lane.labels(image, plan.options)
    finally:
        del image
        return_free_memory()  # before the budget is released: what the next request gets is free
    elapsed_ms = (time.perf_counter() - start) * 1000
    assert labels.shape == size, (labels.shape, size)
    return labels, elapsed_ms


def _measured_lanes(predictor: Predictor, concurrency: int, budget: MemoryBudget) -> Lanes[Predictor]:
    """Requests at once each on a share of the threads where that is measured faster (cached per
    machine, like the backend); a request alone keeps all of them. A runtime's streams hold their
    own copies of the weights: what they keep is held from ``budget`` for good, or they are not
    used where it does not fit."""
    streams, kept = kept_memory(lambda: predictor.in_streams(concurrency))
    lanes, held = Lanes(predictor, streams), ""
    if lanes.streams and kept:
        if budget.reserve(kept):
            held = f" ({kept / 2**20:.0f} MiB held from the memory budget)"
        else:
            _log.warning(
                "%d streams would keep %.0f MiB, more than the memory budget leaves: one model for all requests",
                len(lanes.streams),
                kept / 2**20,
            )
            lanes = Lanes(predictor)
    _log.info("%s; %s%s", predictor.backend.describe(), lanes.describe(), held)
    return lanes


def index_png(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit palette PNG whose pixel values are the class ids, the bytes ``predict`` writes."""
    buf = io.BytesIO()
    save_index_png(labels, palette, buf)
    return buf.getvalue()


def _timing(elapsed_ms: float, path: str) -> dict[str, str]:
    return {"X-Inference-Ms": f"{elapsed_ms:.2f}", "X-Inference-Path": path, "Cache-Control": "no-store"}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the file is truncated or corrupt, empty, or its pixels cannot be used"},
    408: {"description": "the upload stalled (no data for the read timeout)"},
    413: {
        "description": "the upload is larger than the byte limit, or the image has too many pixels, "
        "or its inference needs more than the server's whole memory budget"
    },
    415: {"description": "not an image (declared content type or file signature)"},
    422: {"description": "no file in the form field 'image'"},
    503: {"description": "every inference slot and queue place, or the memory budget, is taken; retry after a moment"},
    504: {"description": "inference did not finish within the server's deadline"},
}
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary", "description": _ACCEPTED}},
                }
            }
        },
    }
}
# The page loads nothing from elsewhere; the policy makes that a browser-enforced guarantee.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_concurrency: int = 2,
    queue_size: int = 16,
    memory_budget: int | None = None,
    tile: int = 512,
    timeout_s: float = 60.0,
    read_timeout_s: float = 30.0,
    warmup: bool = True,
) -> FastAPI:
    """The segmentation web app around one loaded model: the page at ``/`` and the ``/api`` routes.

    ``memory_budget``: bytes that admitted inferences may take together (default: half the
    memory available now); an image whose whole-image inference needs more than its share
    (budget / ``max_concurrency``) runs by ``tile``-pixel sliding windows. ``timeout_s``: the
    inference deadline (504 after it). With ``warmup``, the app's startup runs one small forward
    pass (PyTorch's one-time setup, about a second on a CPU) and measures the model's memory.
    """
    pool = InferencePool(max_concurrency, queue_size)
    budget = MemoryBudget(memory_budget or int(MEMORY_SHARE * available_memory()))
    per_request = budget.total // max_concurrency
    trained = predictor.trained
    classes = [{"id": i, "name": name, "color": list(trained.palette[i])} for i, name in enumerate(trained.class_names)]
    exp = trained.experiment
    planner = MemoryPlanner(
        meta_model(exp, trained.num_classes, trained.in_channels).eval(),
        predictor.options,
        in_channels=trained.in_channels,
        num_classes=trained.num_classes,
        tile=tile,
    )
    model_info = {
        "model": exp.model.name,
        "recipe": exp.name,
        "device": str(predictor.device),
        "backend": predictor.backend.backend,
        "streams": 1,  # requests at once on a share of the threads each (the warm-up measures it)
    }
    page = (files("densepred") / "serve.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warmup:
            await pool.run(predictor, np.zeros((64, 64, trained.in_channels), np.uint8))
            await pool.run(planner.calibrate, trained.model, predictor.device)
            app.state.lanes = await pool.run(_measured_lanes, predictor, max_concurrency, budget)
            model_info["streams"] = max(1, len(app.state.lanes.streams))
        with cancellable_forward():
            yield
        pool.shutdown()

    app = FastAPI(
        title="densepred",
        summary="Semantic segmentation of an uploaded image",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served below without a CDN
        redoc_url=None,
    )
    app.state.predictor, app.state.pool, app.state.budget, app.state.planner = predictor, pool, budget, planner
    app.state.lanes = Lanes(predictor)  # one model for every request until the warm-up measures streams

    def admit_memory(upload: _Upload, width: int, height: int) -> Plan:
        plan = planner.plan(height, width, per_request)
        if plan.nbytes > budget.total:
            raise HTTPException(
                413,
                f"{upload.name}: {width}x{height} needs about {plan.nbytes / 2**20:,.0f} MiB to segment "
                f"({plan.path}), more than this server's memory budget of {budget.total / 2**20:,.0f} MiB; "
                "downscale the image",
            )
        if not budget.reserve(plan.nbytes):
            raise HTTPException(
                503,
                f"the server is busy: {width}x{height} needs about {plan.nbytes / 2**20:,.0f} MiB and "
                f"{(budget.total - budget.reserved) / 2**20:,.0f} of {budget.total / 2**20:,.0f} MiB are free "
                "now; retry in a moment",
                headers={"Retry-After": "2"},
            )
        return plan

    async def run_until_done_or_gone(request: Request, job: Callable[[], Response], token: Cancellation) -> Response:
        """Run ``job`` on the pool; cancel it when the client disconnects meanwhile."""
        task = asyncio.ensure_future(pool.run(job))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                token.cancel("the client disconnected")
        try:
            return task.result()
        except Cancelled as exc:
            if str(exc) == "deadline":
                raise HTTPException(504, f"inference took longer than this server's limit of {timeout_s:g} s") from None
            raise HTTPException(499, f"inference stopped: {exc}") from None  # nobody is listening

    async def segment(request: Request, respond: Callable[[np.ndarray, float, str], Response]) -> Response:
        """Admit, read and check the upload, reserve its memory, then decode, infer and encode
        ``respond``'s answer on the pool."""
        if not pool.admit():
            raise HTTPException(
                503,
                f"the server is busy: {pool.capacity} requests are already running or queued; retry in a moment",
                headers={"Retry-After": "1"},
            )
        try:
            upload = await _read_upload(request, max_upload_bytes, read_timeout_s)
            kind = _check_type(upload)
            plan = admit_memory(upload, *_check_header(upload, kind, max_pixels))
            try:
                token = Cancellation(timeout_s)

                def job() -> Response:
                    labels, elapsed_ms = _segment_upload(app.state.lanes, upload, kind, max_pixels, plan, token)
                    return respond(labels, elapsed_ms, plan.path)

                return await run_until_done_or_gone(request, job, token)
            finally:
                budget.release(plan.nbytes)
        finally:
            pool.release()

    def counts_response(labels: np.ndarray, elapsed_ms: float, path: str) -> Response:
        counts = np.bincount(labels.ravel(), minlength=len(classes))
        body = {
            "height": int(labels.shape[0]),
            "width": int(labels.shape[1]),
            "inference_ms": round(elapsed_ms, 2),
            "counts": [{"id": c["id"], "name": c["name"], "pixels": int(counts[c["id"]])} for c in classes],
        }
        return JSONResponse(body, headers=_timing(elapsed_ms, path))

    def mask_response(labels: np.ndarray, elapsed_ms: float, path: str) -> Response:
        return Response(index_png(labels, trained.palette), media_type="image/png", headers=_timing(elapsed_ms, path))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/health", summary="liveness, the loaded model and the current load")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            **model_info,
            "in_flight": pool.admitted,
            "capacity": pool.capacity,
            "memory_budget_mib": round(budget.total / 2**20, 1),
            "memory_reserved_mib": round(budget.reserved / 2**20, 1),
        }

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(api_docs_html(app.openapi()), headers=_PAGE_HEADERS)

    @app.get("/api/classes", summary="class ids, names and RGB colours")
    async def get_classes() -> dict[str, Any]:
        return {**model_info, "in_channels": trained.in_channels, "classes": classes}

    @app.post(
        "/api/segment",
        summary="segment an image: the class-id mask as a palette PNG, or per-class pixel counts",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {}, "application/json": {}},
                "description": "PNG: pixel value = class id (header X-Inference-Ms); JSON with format=json",
            },
            **_ERRORS,
        },
        openapi_extra=_IMAGE_BODY,
    )
    async def post_segment(
        request: Request, fmt: Literal["png", "json"] = Query("png", alias="format", description="png or json")
    ) -> Response:
        return await segment(request, counts_response if fmt == "json" else mask_response)

    @app.post(
        "/api/counts",
        summary="per-class pixel counts of an image's segmentation",
        responses=_ERRORS,
        openapi_extra=_IMAGE_BODY,
    )
    async def post_counts(request: Request) -> Response:
        return await segment(request, counts_response)

    return app


def api_docs_html(schema: dict[str, Any]) -> str:
    """The API reference as one self-contained page (no script, nothing fetched from elsewhere),
    written from the OpenAPI schema that ``/openapi.json`` serves."""
    from html import escape

    info = schema.get("info", {})
    parts = [
        "<!doctype html><meta charset=utf-8><title>densepred API</title><style>body{font:15px system-ui;"
        "max-width:860px;margin:2em auto;padding:0 1em}code{background:#eee;padding:0 .3em}"
        "h2{font-size:1.05em;margin-top:1.6em}td{padding:.15em .8em .15em 0;vertical-align:top}</style>",
        f"<h1>{escape(info.get('title', 'API'))} <small>v{escape(str(info.get('version', '')))}</small></h1>",
        f"<p>{escape(info.get('summary', ''))}. Machine-readable: <a href=/openapi.json>/openapi.json</a>.</p>",
    ]
    for route, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {escape(route)}</code> {escape(op.get('summary', ''))}</h2>")
            params = op.get("parameters", [])
            if params:
                rows = "".join(
                    f"<tr><td><code>{escape(p['name'])}</code> ({escape(p.get('in', ''))})</td>"
                    f"<td>{escape(p.get('description', '') or str(p.get('schema', {}).get('default', '')))}</td></tr>"
                    for p in params
                )
                parts.append(f"<table>{rows}</table>")
            if "requestBody" in op:
                kinds = ", ".join(op["requestBody"].get("content", {}))
                parts.append(f"<p>Body: {escape(kinds)}, the image in the field <code>image</code>.</p>")
            rows = "".join(
                f"<tr><td><b>{escape(str(code))}</b></td><td>{escape(r.get('description', ''))}</td></tr>"
                for code, r in op.get("responses", {}).items()
            )
            parts.append(f"<table>{rows}</table>")
    return "\n".join(parts)


def http_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not complete
    ``header_timeout_s`` seconds after it opened (uvicorn waits for them forever: one slow
    client per connection could hold the server's sockets)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:  # noqa: ANN001 (asyncio's protocol)
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request line+headers yet
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


@contextmanager
def running_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, header_timeout_s: float = 10.0
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread (tests, notebooks); yields its base URL.

    ``port=0`` takes a free port, so parallel runs never collide.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=http_protocol(header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="densepred-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
