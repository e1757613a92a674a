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

from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from palettelink.errors import PaletteLinkError, ServiceUnavailable, TooLarge
from palettelink.fetch import edge_file, edge_listing
from server import __version__
from server.auth import TokenAuth
from server.errors import clip, http_error, http_status
from server.service import Service


def create_app(service: Service, auth: TokenAuth | None = None, max_body_bytes: int = 16 << 20) -> FastAPI:
    auth = auth or TokenAuth({})
    app = FastAPI(title="PaletteLink server", version=__version__, docs_url="/docs", redoc_url=None)

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

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.status()

    @app.get("/api/frames")
    def frames(limit: int = Query(50, ge=0, le=1000)) -> list[dict[str, Any]]:
        """Recent frames, newest first (successes and errors)."""
        return service.recent_frames(limit)

    @app.post("/api/analyze")
    async def analyze(request: Request, bundle: str = "", task: str = "", want_preview: bool = False,
                      frame_id: int = 0) -> dict[str, Any]:
        """Body: one coded frame (``application/octet-stream``). Same checks and results as the
        gRPC ``Analyze``; errors as JSON ``{"error": {code, status, message}}``."""
        client = auth.client_for(request.headers.get("authorization"))
        body = bytearray()
        async for chunk in request.stream():  # never buffer more than the limit
            body += chunk
            if len(body) > max_body_bytes:
                raise TooLarge(f"request body exceeds {max_body_bytes} bytes")
        payload = bytes(body)
        result = await run_in_threadpool(service.analyze, bundle, task, payload, want_preview,
                                         frame_id=frame_id, client=client)
        return result.to_dict()

    @app.get("/api/bundles")
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

    @app.get("/api/bundles/{name}/{version}/edge")
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

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return DASHBOARD

    app.state.service = service
    return app


def _validation_message(exc: RequestValidationError) -> str:
    """``query parameter 'limit': Input should be less than or equal to 1000`` (each problem, short)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{clip(where, 80)}: {clip(str(err.get('msg', 'invalid')), 200)}")
    return "; ".join(parts) or "invalid request"


DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PaletteLink server</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
 header{background:#1d232b;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
 header h1{font-size:18px;margin:0} header span{opacity:.75}
 main{padding:16px 20px;display:grid;gap:16px}
 section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px}
 h2{font-size:15px;margin:0 0 8px} table{border-collapse:collapse;width:100%}
 th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f2;white-space:nowrap}
 th{font-weight:600;color:#555} td.n{text-align:right;font-variant-numeric:tabular-nums}
 .err{color:#b3261e} .ok{color:#1b7f3b} .muted{color:#888} code{font-size:12px}
</style></head><body>
<header><h1>PaletteLink</h1><span id="state">…</span><span id="meta"></span>
 <span style="margin-left:auto"><a style="color:#9cf" href="/metrics">metrics</a> ·
 <a style="color:#9cf" href="/docs">API</a></span></header>
<main>
<section><h2>Bundles</h2><table id="bundles"><thead><tr><th>bundle</th><th>tasks</th><th>classes</th>
 <th>codecs and levels</th><th>table hash</th></tr></thead><tbody></tbody></table></section>
<section><h2>Open streams</h2><table id="streams"><thead><tr><th>client</th><th>bundle</th><th>task</th>
 <th class="n">frames</th><th class="n">bytes</th><th class="n">errors</th><th>since</th></tr></thead>
 <tbody></tbody></table></section>
<section><h2>Recent frames</h2><table id="frames"><thead><tr><th>time</th><th>client</th><th>frame</th>
 <th>bundle</th><th>codec/level</th><th class="n">bytes</th><th class="n">bpp</th><th class="n">boxes</th>
 <th>detections</th><th class="n">decode ms</th><th class="n">queue ms</th><th class="n">task ms</th>
 <th class="n">total ms</th><th>status</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
const num = (v, d = 1) => v == null ? "" : Number(v).toFixed(d);
const t = s => new Date(s * 1000).toLocaleTimeString();
const td = (v, cls = "") => `<td${cls ? ` class="${cls}"` : ""}>${v}</td>`;
const row = cells => `<tr>${cells.join("")}</tr>`;
function fill(id, rows) {
  document.querySelector(`#${id} tbody`).innerHTML =
    rows.join("") || `<tr><td class="muted" colspan="14">none</td></tr>`;
}
const levels = c => c.levels.map(l => esc(l.level) + (l.mean_bpp ? ` (${num(l.mean_bpp, 3)} bpp)` : ""));
const bundleRow = b => row([
  td(esc(`${b.name}/${b.version}`)), td(esc(b.tasks.join(", "))), td(esc(b.class_names.join(", "))),
  td(b.codecs.map(c => `${esc(c.name)}: ${levels(c).join(" ")}`).join("<br>")),
  td(`<code>${esc(b.table_hash.slice(0, 16))}</code>`)]);
const streamRow = s => row([
  td(esc(s.client)), td(esc(s.bundle)), td(esc(s.task)), td(s.frames, "n"), td(s.bytes, "n"),
  td(s.errors, "n"), td(t(s.opened))]);
const status = f => f.error
  ? `<span class="err" title="${esc(f.error.message)}">${esc(f.error.status)}</span>`
  : '<span class="ok">OK</span>';
const frameRow = f => row([
  td(t(f.time)), td(esc(f.client)), td(esc(f.frame_id)), td(esc(f.bundle)),
  td(f.codec ? `${esc(f.codec)}/${esc(f.level)}${f.truncated ? " (cut)" : ""}` : ""),
  td(f.bytes, "n"), td(num(f.bpp, 3), "n"), td(f.boxes ?? "", "n"),
  td((f.detections || []).map(d => `${esc(d[0])} ${num(d[1], 2)}`).join(", ")),
  td(num(f.timings?.decode_ms), "n"), td(num(f.timings?.queue_ms), "n"),
  td(num(f.timings?.task_ms), "n"), td(num(f.timings?.total_ms), "n"), td(status(f))]);
async function refresh() {
  const state = document.getElementById("state");
  try {
    const [info, frames] = await Promise.all([
      fetch("api/info").then(r => r.json()), fetch("api/frames?limit=50").then(r => r.json())]);
    state.innerHTML = info.ready ? '<b class="ok">ready</b>' : '<b class="err">loading</b>';
    document.getElementById("meta").textContent =
      `v${info.server_version} · ${info.device} · up ${Math.round(info.uptime_s)} s`;
    fill("bundles", info.bundles.map(bundleRow));
    fill("streams", info.streams.map(streamRow));
    fill("frames", frames.map(frameRow));
  } catch (e) {
    state.innerHTML = '<b class="err">unreachable</b>';
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
