"""What reaches a route of the HTTP app, and what every answer carries.

With tokens configured, every route needs one (:class:`RequireToken`): ``authorization: Bearer``,
or the session cookie the dashboard's ``/login`` form sets (``server/http_login.py``), since a
browser cannot add a header to a page load or an ``EventSource``. A write authenticated by the cookie
must come from this origin too (:func:`same_origin`). A refusal is 401 with ``WWW-Authenticate:
Bearer`` in the one error shape; a browser's page load is sent to the login form instead. A body is
read only up to its limit (:func:`read_body`).

Every response carries the browser security headers (:class:`SecurityHeaders`): a Content-Security-Policy
that allows nothing from elsewhere (scripts, styles, images and connections from this server only, an
HTML page's own inline parts by their hash: :func:`html_page`) with ``frame-ancestors 'none'`` and
``X-Frame-Options: DENY`` (no framing), ``X-Content-Type-Options: nosniff`` and a Referrer-Policy.
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from palettelink.errors import PaletteLinkError, TooLarge, Unauthenticated
from server.auth import TokenAuth
from server.errors import ErrorCounter, http_status

LOGIN_PATHS = frozenset({"/login", "/logout"})  # the way in (and out) must be reachable without one
# The session cookie. Over https it carries the __Host- prefix: the browser then only keeps it when it
# is Secure, for Path=/ and without Domain, so no other host or plain-http page can set or shadow it.
SESSION_COOKIE, SECURE_SESSION_COOKIE = "palettelink_session", "__Host-palettelink_session"
CHALLENGE = 'Bearer realm="palettelink"'
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_NEXT = 512  # characters of the login form's return path
CLIENT = "palettelink.client"  # the ASGI scope key where RequireToken leaves the caller's client name


# -- browser security headers ----------------------------------------------------------------------


def csp(scripts: tuple[str, ...] = (), styles: tuple[str, ...] = ()) -> str:
    """The Content-Security-Policy: this server's own scripts, styles, images (and the ``data:``/``blob:``
    pictures the dashboard draws from what it fetched), connections and forms; nothing from elsewhere,
    no plugins, no framing. ``scripts``/``styles``: hash sources of a page's own inline parts."""
    def extra(hashes: tuple[str, ...]) -> str:
        return "".join(f" '{h}'" for h in hashes)

    return ("default-src 'self'; "
            f"script-src 'self'{extra(scripts)}; style-src 'self'{extra(styles)}; "
            "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def inline_hashes(page: str, tag: str) -> tuple[str, ...]:
    """CSP hash sources (``sha256-…``) of each inline ``<tag>…</tag>`` of ``page`` (no ``src``)."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    return tuple("sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in bodies)


# Referrer-Policy same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
# this server's own form posts, which the cross-origin check (same_origin) must then refuse.
SECURITY_HEADERS = {
    "content-security-policy": csp(),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response (the outermost middleware, so the
    login redirects and 401s carry them too). A route that sets its own CSP (an inline part's hash)
    keeps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers.append(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CrossOrigin(PaletteLinkError):
    """A cookie-authenticated write sent from another origin (a cross-site request forgery)."""

    code = "PERMISSION_DENIED"


class RequireToken:
    """ASGI middleware: with tokens configured, a request reaches a route only with a valid
    ``authorization: Bearer`` header or session cookie, except on ``open_paths``.

    A pure ASGI wrapper, not ``BaseHTTPMiddleware``, so the event stream of ``/api/live`` and the
    bundle file downloads pass through unbuffered. The caller's client name goes to ``scope[CLIENT]``.
    A write (POST) authenticated by the cookie must come from this origin too: SameSite=Strict keeps
    other sites' requests from carrying the cookie, and this check holds where a browser does not.
    """

    def __init__(self, app: ASGIApp, auth: TokenAuth, open_paths: frozenset[str],
                 metrics: ErrorCounter | None = None) -> None:
        self.app, self.auth, self.open_paths, self.metrics = app, auth, open_paths, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[CLIENT] = ""
        if not self.auth.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            scope[CLIENT] = self._authenticate(request)
        except (Unauthenticated, CrossOrigin) as e:
            await self._refuse(request, e)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authenticate(self, request: Request) -> str:
        """The caller's client name: a header says it (and must be right), else the session cookie."""
        header = request.headers.get("authorization")
        if header is not None:
            return self.auth.client_for(header)
        cookie = request.cookies.get(SECURE_SESSION_COOKIE) or request.cookies.get(SESSION_COOKIE)
        if not cookie:
            raise Unauthenticated("missing 'authorization: Bearer <token>' (browsers: log in at /login)")
        client = self.auth.client_for_session(cookie)
        if request.method not in SAFE_METHODS and not same_origin(request):
            raise CrossOrigin("a request with the session cookie from another origin; send it from this "
                              "server's pages or with 'authorization: Bearer <token>'")
        return client

    def _refuse(self, request: Request, exc: PaletteLinkError) -> Response:
        """A page load of a browser goes to the login form; anything else is our JSON 401 (or 403)."""
        if (isinstance(exc, Unauthenticated) and request.method in ("GET", "HEAD")
                and "authorization" not in request.headers
                and "text/html" in request.headers.get("accept", "")):
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": local_path(back)}), status_code=303)
        status, body = http_status(exc, self.metrics)
        headers = {}
        if status == 401:  # RFC 6750: an error code only when credentials were sent
            sent = "authorization" in request.headers or SESSION_COOKIE in request.cookies \
                or SECURE_SESSION_COOKIE in request.cookies
            headers["WWW-Authenticate"] = CHALLENGE + (', error="invalid_token"' if sent else "")
        return JSONResponse(body, status_code=status, headers=headers)


def same_origin(request: Request) -> bool:
    """Whether a browser sent ``request`` from this server's own pages: its ``Origin`` names this
    host (no ``Origin``: not a browser's cross-origin write, which always has one)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower() != ""


def local_path(target: str | None) -> str:
    """``target`` if it is a path of this server (so the login form never redirects elsewhere), else ``/``."""
    t = target or "/"
    if (len(t) > MAX_NEXT or not t.startswith("/") or t.startswith("//") or "\\" in t
            or not t.isprintable() or t.split("?", 1)[0] in LOGIN_PATHS):
        return "/"
    return t


def html_page(text: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """An HTML answer whose CSP allows its own inline ``<style>`` and ``<script>`` (by hash), no more."""
    policy = csp(inline_hashes(text, "script"), inline_hashes(text, "style"))
    return HTMLResponse(text, status_code=status,
                        headers={**(headers or {}), "content-security-policy": policy})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (:class:`TooLarge`) as soon as it passes ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():  # never buffer more than the limit
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body exceeds {limit} bytes")
    return bytes(body)
