"""HTTP transport (FastAPI): probes, Prometheus metrics, JSON status, a small dashboard, and a REST
twin of ``Analyze`` — all thin routes over the same :class:`~server.service.Service`.

Probes, metrics and the dashboard are open (put them behind the cluster network); ``/api/analyze``
(coded frames) and ``/api/bundles/...`` (the edge part of each bundle, for ``palettelink-edge
--fetch-bundle``; see :mod:`palettelink.fetch`) need a bearer token when tokens are configured.
Errors reach clients only through ``server/errors.py``, all in one JSON shape ``{"error": {code,
status, message}}`` — also the framework's own refusals (a bad query parameter, an unknown route),
never FastAPI's ``{"detail": …}``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from palettelink.errors import PaletteLinkError, ServiceUnavailable, TooLarge
from palettelink.fetch import edge_file, edge_listing
from server import __version__
from server import api_models as m
from server.auth import TokenAuth
from server.dashboard import TryIt, bench_curves, render
from server.errors import clip, http_error, http_status
from server.service import Service

STATIC = Path(__file__).with_name("static")
LIVE_PERIOD_S = 1.0  # how often /api/live sends the streams
LIVE_MAX_S = 600.0  # one event stream's lifetime; EventSource reconnects by itself


def create_app(service: Service, auth: TokenAuth | None = None, max_body_bytes: int = 16 << 20,
               bench_json: Path | None = None) -> FastAPI:
    auth = auth or TokenAuth({})
    app = FastAPI(title="PaletteLink server", version=__version__, docs_url=None, redoc_url=None)
    try_it = TryIt(service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Swagger UI's own files, served from a package (FastAPI's default page loads them from a CDN).
    # fastapi-offline ships Swagger UI 5, which renders OpenAPI 3.1 (swagger-ui-bundle's 4.15 does not).
    swagger = _swagger_assets()
    if swagger is not None:
        app.mount("/swagger", StaticFiles(directory=swagger), name="swagger")

    async def _error(request: Request, exc: Exception) -> JSONResponse:
        status, body = http_status(exc, service.metrics)
        retry_ms = int(getattr(exc, "retry_after_ms", 0) or 0)
        headers = {"Retry-After": str(max(1, -(-retry_ms // 1000)))} if retry_ms else None
        return JSONResponse(body, status_code=status, headers=headers)

    # Our errors are answered quietly; anything else is also answered as JSON (and logged once more
    # by the ASGI server, since Starlette re-raises unexpected exceptions after answering).
    app.add_exception_handler(PaletteLinkError, _error)
    app.add_exception_handler(Exception, _error)

    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(http_error(400, _validation_message(exc)), status_code=400)

    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{clip(request.method, 16)} {clip(request.url.path, 100)}"
        return JSONResponse(http_error(exc.status_code, f"{clip(str(exc.detail), 200)} ({where})"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: 503 until the bundles are loaded, so no traffic reaches a cold replica, and again
        from the moment a drain starts (SIGTERM), so load balancers stop sending before the ports close."""
        ok = service.ready and not service.draining
        return JSONResponse({"ready": ok, "draining": service.draining,
                             "bundles": sorted(service.bundles) if ok else []},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/api/info", response_model=m.InfoModel)
    def info() -> dict[str, Any]:
        """Server, bundles, open streams, queues and limits."""
        return service.status()

    @app.get("/api/frames", response_model=list[m.FrameSummaryModel], response_model_exclude_none=True)
    def frames(limit: int = Query(50, ge=0, le=1000)) -> list[dict[str, Any]]:
        """Recent frames, newest first (successes and errors)."""
        return service.recent_frames(limit)

    @app.get("/api/streams", response_model=m.StreamsModel)
    def streams() -> dict[str, Any]:
        """Open streams (rates over 10 s, server latency p50/p95, per-frame series, newest frame's
        boxes) and the last few closed ones."""
        return service.stream_stats()

    @app.get("/api/live", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "server-sent events, each `data:` an /api/streams answer"}})
    async def live(request: Request) -> StreamingResponse:
        """Server-sent events: the ``/api/streams`` answer every second (the Live and Frame pages)."""
        async def events():  # noqa: ANN202
            loop = asyncio.get_running_loop()
            end = loop.time() + LIVE_MAX_S
            yield "retry: 2000\n\n"
            while loop.time() < end and not service.draining and not await request.is_disconnected():
                yield f"data: {json.dumps(service.stream_stats())}\n\n"
                await asyncio.sleep(LIVE_PERIOD_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/try", response_model=m.TryModel,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def try_image(request: Request, bundle: str = "", task: str = "", codec: str = "",
                        level: int | None = Query(None, ge=0, le=255),
                        target_bpp: float | None = Query(None, gt=0, le=1000)) -> dict[str, Any]:
        """Body: an image file (PNG, JPEG, BMP, WebP, TIFF). The server codes it with the edge's encoder
        (``codec`` at ``level``, or at the finest level within ``target_bpp``; default the bundle's codec at
        its finest level), decodes it and runs the
        task, and the same at baseline 8 bits as the reference. Nothing is written to disk; not an
        image, too many pixels (checked from the header), unknown bundle, codec or level: 4xx."""
        auth.client_for(request.headers.get("authorization"))
        data = await _read_body(request, max_body_bytes)
        return await run_in_threadpool(try_it.run, data, bundle, task, codec, level, target_bpp)

    @app.get("/api/bench", response_model=m.BenchModel)
    def bench() -> dict[str, Any]:
        """The rate–accuracy curves of the bench JSON (``--bench-json``, default the repository's
        ``docs/results/bench-eval.json``): per method, (bpp, AP50) points by bpp."""
        return bench_curves(bench_json)

    @app.post("/api/analyze", response_model=m.AnalyzeModel)
    async def analyze(request: Request, bundle: str = "", task: str = "", want_preview: bool = False,
                      frame_id: int = 0) -> dict[str, Any]:
        """Body: one coded frame (``application/octet-stream``). Same checks and results as the
        gRPC ``Analyze``; errors as JSON ``{"error": {code, status, message}}``."""
        client = auth.client_for(request.headers.get("authorization"))
        payload = await _read_body(request, max_body_bytes)
        result = await run_in_threadpool(service.analyze, bundle, task, payload, want_preview,
                                         frame_id=frame_id, client=client)
        return result.to_dict()

    @app.get("/api/bundles", response_model=m.BundlesModel)
    def bundles(request: Request) -> dict[str, Any]:
        """The bundles this server serves, each with the path of its edge part's listing."""
        auth.client_for(request.headers.get("authorization"))
        if not service.ready:
            raise ServiceUnavailable("bundles are still loading")
        return {"bundles": [
            {"id": lb.bundle.id, "name": lb.bundle.name, "version": lb.bundle.version,
             "table_hash": lb.bundle.table_hash_hex,
             "edge": f"/api/bundles/{lb.bundle.name}/{lb.bundle.version}/edge"}
            for lb in service.bundles.values()]}

    @app.get("/api/bundles/{name}/{version}/edge", response_model=m.EdgeListingModel)
    def bundle_edge(name: str, version: str, request: Request) -> dict[str, Any]:
        """The edge part of one bundle: ``manifest.json`` and the edge side's files, each with its
        sha256 and size. Unknown bundle or version: 404."""
        auth.client_for(request.headers.get("authorization"))
        return edge_listing(service.resolve(f"{name}/{version}").bundle)

    @app.get("/api/bundles/{name}/{version}/edge/{path:path}")
    def bundle_edge_file(name: str, version: str, path: str, request: Request) -> FileResponse:
        """One file of the edge part (only names in the listing; anything else is 404)."""
        auth.client_for(request.headers.get("authorization"))
        p = edge_file(service.resolve(f"{name}/{version}").bundle, path)
        return FileResponse(p, media_type="application/octet-stream")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return render("live")

    @app.get("/frame", response_class=HTMLResponse, include_in_schema=False)
    def frame_page() -> str:
        return render("frame")

    @app.get("/try", response_class=HTMLResponse, include_in_schema=False)
    def try_page() -> str:
        return render("try")

    @app.get("/rate", response_class=HTMLResponse, include_in_schema=False)
    def rate_page() -> str:
        return render("rate")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI with its scripts and styles from this server (works offline)."""
        if swagger is None:
            return HTMLResponse("<p>Swagger UI needs the package <code>fastapi-offline</code> (pip install "
                                "'palettelink[server]'); the schema is at <a href=/openapi.json>/openapi.json"
                                "</a>.</p>")
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                                   title="PaletteLink server · API",
                                   swagger_js_url="/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/swagger-ui.css",
                                   swagger_favicon_url="/swagger/favicon.png")

    app.state.service = service
    return app


def _swagger_assets() -> Path | None:
    """The folder of Swagger UI's scripts and styles in the installed ``fastapi-offline`` (found
    without importing it), or ``None``."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "static"
    return d if (d / "swagger-ui-bundle.js").is_file() else None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (:class:`TooLarge`) as soon as it passes ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():  # never buffer more than the limit
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body exceeds {limit} bytes")
    return bytes(body)


def _validation_message(exc: RequestValidationError) -> str:
    """``query parameter 'limit': Input should be less than or equal to 1000`` (each problem, short)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{clip(where, 80)}: {clip(str(err.get('msg', 'invalid')), 200)}")
    return "; ".join(parts) or "invalid request"

