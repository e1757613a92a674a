"""HTTP transport (FastAPI): probes, Prometheus metrics, JSON status, a small dashboard, and a REST
twin of ``Analyze`` — all thin routes over the same :class:`~server.service.Service`.

With tokens configured, every route needs one (``server/http_security.py``: a bearer header, or the
session cookie of the dashboard's login form, ``server/http_login.py``). Open are only the probes
``/healthz`` and ``/readyz`` (kubelets send no token), the login form itself and, with
``public_metrics`` (``--public-metrics``), ``/metrics``. Client-supplied names are bounded
(:func:`server.errors.check_name`) before anything stores or echoes them. Errors reach clients only
through ``server/errors.py``, all in one JSON shape ``{"error": {code, status, message}}`` — also the
framework's own refusals (a bad query parameter, an unknown route), never FastAPI's ``{"detail": …}``.

Every response carries the browser security headers (:class:`~server.http_security.SecurityHeaders`).
State changes on POST only: ``/logout`` deletes the cookie on a same-origin POST; a GET only shows its
button.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from palettelink.errors import PaletteLinkError, ServiceUnavailable
from palettelink.fetch import edge_file, edge_listing
from server import __version__
from server import api_models as m
from server.auth import TokenAuth
from server.dashboard import PAGES, TRY_MAX_PIXELS, TRY_UPLOADS, TryIt, bench_curves, render
from server.errors import check_name, clip, http_error, http_status
from server.http_login import add_login_routes
from server.http_security import CLIENT, LOGIN_PATHS, RequireToken, SecurityHeaders, html_page, read_body
from server.previews import PREVIEW_PATH
from server.service import Service

STATIC = Path(__file__).with_name("static")
LIVE_PERIOD_S = 1.0  # how often /api/live sends the streams
LIVE_MAX_S = 600.0  # one event stream's lifetime; EventSource reconnects by itself
PROBES = frozenset({"/healthz", "/readyz"})  # kubelets and load balancers send no token
FAVICON = "/favicon.ico"  # browsers ask for it unprompted, logged in or not: never a 401 or 404
MAX_PATH = 512  # characters of a bundle file path a client asks for
MAX_FRAME_ID = (1 << 64) - 1  # the protocol's uint64
FAVICON_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" '
               b'rx="3" fill="#1d232b"/><circle cx="8" cy="8" r="4" fill="#9cf"/></svg>')


def create_app(service: Service, auth: TokenAuth | None = None, max_body_bytes: int = 16 << 20,
               bench_json: Path | None = None, public_metrics: bool = False,
               try_uploads: int = TRY_UPLOADS, try_max_pixels: int = TRY_MAX_PIXELS) -> FastAPI:
    """The HTTP app over ``service``. With ``auth`` enabled every route needs a token but the probes
    and the login form, and ``/metrics`` too unless ``public_metrics``."""
    auth = auth or TokenAuth({})
    app = FastAPI(title="PaletteLink server", version=__version__, docs_url=None, redoc_url=None)
    open_paths = PROBES | LOGIN_PATHS | {FAVICON} | ({"/metrics"} if public_metrics else set())
    app.add_middleware(RequireToken, auth=auth, open_paths=frozenset(open_paths),  # type: ignore[arg-type]
                       metrics=service.metrics)
    app.add_middleware(SecurityHeaders)  # type: ignore[arg-type]  # added last: the outermost
    try_it = TryIt(service, max_uploads=try_uploads, max_pixels=try_max_pixels)
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
        """Recent frames, newest first (successes and errors); ``key`` names each, and ``preview_url``
        its rebuilt picture while the preview store keeps it."""
        return service.recent_frames(limit)

    @app.get(PREVIEW_PATH, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "the rebuilt picture"},
                        404: {"description": "not asked for, or no longer kept (error JSON)"}})
    def frame_preview(key: int = PathParam(ge=0, le=MAX_FRAME_ID)) -> Response:
        """The picture the server rebuilt for frame ``key`` of ``/api/frames`` (asked for with
        ``want_preview``), while the preview store's bound keeps it; else 404."""
        return Response(service.preview(key), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

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
                        target_bpp: float | None = Query(None, gt=0, le=1000),
                        want_preview: bool = False) -> dict[str, Any]:
        """Body: an image file (PNG, JPEG, BMP, WebP, TIFF). The server codes it with the edge's encoder
        (``codec`` at ``level``, or at the finest level within ``target_bpp``; default the bundle's codec at
        its finest level), decodes it and runs ``task`` (default the bundle's own; the tasks of a bundle
        are in ``/api/info``), and the same at baseline 8 bits as the reference. With ``want_preview``
        each answer names the picture the server rebuilt (``preview_url``, kept in memory a while).
        Nothing is written to disk; not an image, unknown bundle, task, codec or level: 400; more pixels
        than the upload budget (``--try-max-pixels``, read from the header, before any decoding): 413.
        Admitted first: beyond ``--max-try-uploads`` at once, or while admission control refuses frames,
        429 at once with ``Retry-After``."""
        for value, what in ((bundle, "bundle name"), (task, "task name"), (codec, "codec name")):
            check_name(value, what)
        with try_it.admitted():
            data = await read_body(request, max_body_bytes)
            return await run_in_threadpool(try_it.run, data, bundle, task, codec, level, target_bpp,
                                           want_preview)

    @app.get("/api/bench", response_model=m.BenchModel)
    def bench() -> dict[str, Any]:
        """The rate–accuracy curves of the bench JSON (``--bench-json``, default the repository's
        ``docs/results/bench-eval.json``): per method, (bpp, AP50) points by bpp."""
        return bench_curves(bench_json)

    @app.post("/api/analyze", response_model=m.AnalyzeModel)
    async def analyze(request: Request, bundle: str = "", task: str = "", want_preview: bool = False,
                      frame_id: int = Query(0, ge=0, le=MAX_FRAME_ID)) -> dict[str, Any]:
        """Body: one coded frame (``application/octet-stream``). Same checks and results as the
        gRPC ``Analyze``; errors as JSON ``{"error": {code, status, message}}``."""
        client = _client(request)
        payload = await read_body(request, max_body_bytes)
        peer = request.client.host if request.client else ""
        result = await run_in_threadpool(service.analyze, bundle, task, payload, want_preview,
                                         frame_id=frame_id, client=client, admission_key=client or peer)
        return result.to_dict()

    @app.get("/api/bundles", response_model=m.BundlesModel)
    def bundles() -> dict[str, Any]:
        """The bundles this server serves, each with the path of its edge part's listing."""
        if not service.ready:
            raise ServiceUnavailable("bundles are still loading")
        return {"bundles": [
            {"id": lb.bundle.id, "name": lb.bundle.name, "version": lb.bundle.version,
             "table_hash": lb.bundle.table_hash_hex,
             "edge": f"/api/bundles/{lb.bundle.name}/{lb.bundle.version}/edge"}
            for lb in service.bundles.values()]}

    @app.get("/api/bundles/{name}/{version}/edge", response_model=m.EdgeListingModel)
    def bundle_edge(name: str, version: str) -> dict[str, Any]:
        """The edge part of one bundle: ``manifest.json`` and the edge side's files, each with its
        sha256 and size. Unknown bundle or version: 404."""
        return edge_listing(service.resolve(_bundle_id(name, version)).bundle)

    @app.get("/api/bundles/{name}/{version}/edge/{path:path}")
    def bundle_edge_file(name: str, version: str, path: str) -> FileResponse:
        """One file of the edge part (only names in the listing; anything else is 404)."""
        rel = check_name(path, "file path", MAX_PATH)
        p = edge_file(service.resolve(_bundle_id(name, version)).bundle, rel)
        return FileResponse(p, media_type="application/octet-stream")

    def dashboard_page(name: str) -> Any:
        def show() -> str:
            return render(name, logout=auth.enabled)

        return show

    for path, name, _ in PAGES:  # Live, Frame view, Try it, Rate–accuracy
        app.add_api_route(path, dashboard_page(name), methods=["GET"], response_class=HTMLResponse,
                          include_in_schema=False)

    add_login_routes(app, auth, service.metrics)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI with its scripts and styles from this server (works offline)."""
        if swagger is None:
            return HTMLResponse("<p>Swagger UI needs the package <code>fastapi-offline</code> (pip install "
                                "'palettelink[server]'); the schema is at <a href=/openapi.json>/openapi.json"
                                "</a>.</p>")
        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                                   title="PaletteLink server · API",
                                   swagger_js_url="/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/swagger-ui.css",
                                   swagger_favicon_url="/swagger/favicon.png")
        return html_page(bytes(page.body).decode())  # its inline start-up script allowed by hash

    @app.get(FAVICON, include_in_schema=False)
    def favicon() -> Response:
        """The tab icon (open: a browser asks for it before anyone logs in)."""
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    app.state.service = service
    app.state.try_it = try_it
    return app


def _client(request: Request) -> str:
    """The caller's client name, as :class:`RequireToken` found it (``""`` with auth off)."""
    return str(request.scope.get(CLIENT, ""))


def _bundle_id(name: str, version: str) -> str:
    """``name/version`` from a URL, each part bounded before an error can quote it."""
    return f"{check_name(name, 'bundle name')}/{check_name(version, 'bundle version')}"


def _swagger_assets() -> Path | None:
    """The folder of Swagger UI's scripts and styles in the installed ``fastapi-offline`` (found
    without importing it), or ``None``."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "static"
    return d if (d / "swagger-ui-bundle.js").is_file() else None


def _validation_message(exc: RequestValidationError) -> str:
    """``query parameter 'limit': Input should be less than or equal to 1000`` (each problem, short)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{clip(where, 80)}: {clip(str(err.get('msg', 'invalid')), 200)}")
    return "; ".join(parts) or "invalid request"
