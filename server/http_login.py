"""The dashboard's way in and out when the server has tokens: ``/login`` (a form with one token field;
a known token gets a session cookie) and ``/logout`` (a button whose POST forgets the cookie; a GET
changes nothing). Both pages are self-contained: no asset needs a login to load.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.responses import RedirectResponse

from palettelink.errors import Unauthenticated
from server.auth import SESSION_TTL_S, TokenAuth
from server.errors import ErrorCounter
from server.http_security import (
    CHALLENGE,
    SECURE_SESSION_COOKIE,
    SESSION_COOKIE,
    CrossOrigin,
    html_page,
    local_path,
    read_body,
    same_origin,
)

MAX_FORM_BYTES = 4096  # the login form: a token and a path


def login_page(target: str, error: str = "") -> str:
    """The login form: one token field; self-contained (no asset needs a login to load)."""
    err = f'<p class="err" id="login-error">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PaletteLink · log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>body{{font:15px system-ui,sans-serif;max-width:28em;margin:12vh auto;padding:0 1em;color:#222}}
input{{font:inherit;width:100%;box-sizing:border-box;padding:.45em;margin:.3em 0 .9em}}
button{{font:inherit;padding:.4em 1.4em}} .err{{color:#b00020}} .muted{{color:#666}}</style></head>
<body><h1>PaletteLink</h1>
<p class="muted">This server needs a token: a line of its <code>--tokens-file</code> (or
<code>$PALETTELINK_TOKENS</code>). It is checked once; the browser then holds a session cookie for
{SESSION_TTL_S // 3600} h, never the token.</p>
{err}<form id="login" method="post" action="/login"><label for="token">token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{html.escape(target)}"><button type="submit">Log in</button></form>
</body></html>
"""


def logout_page() -> str:
    """What a GET of /logout shows: the button that logs out (a POST; a link never changes state)."""
    return """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PaletteLink · log out</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/favicon.ico" type="image/svg+xml"></head>
<body><h1>PaletteLink</h1><form id="logout-form" method="post" action="/logout">
<button type="submit" id="logout">Log out</button></form></body></html>
"""


def add_login_routes(app: FastAPI, auth: TokenAuth, metrics: ErrorCounter) -> None:
    """``/login`` and ``/logout`` on ``app`` (outside the API schema); ``metrics`` counts unknown tokens."""

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> Response:
        """The dashboard's way in (no token needed to see it)."""
        target = local_path(request.query_params.get("next"))
        if not auth.enabled:
            return RedirectResponse(target, status_code=303)
        return html_page(login_page(target), headers={"Cache-Control": "no-store"})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Form ``token=…&next=…``: a known token gets a session cookie (HttpOnly, SameSite=Strict,
        Secure over https) and a redirect to ``next``; anything else the form again, 401."""
        if not auth.enabled:
            return RedirectResponse("/", status_code=303)
        if not same_origin(request):
            raise CrossOrigin("a login form posted from another origin")
        form = parse_qs((await read_body(request, MAX_FORM_BYTES)).decode("utf-8", "replace"),
                        max_num_fields=8)
        target = local_path((form.get("next") or ["/"])[0])
        try:
            session = auth.session_for((form.get("token") or [""])[0].strip())
        except Unauthenticated:
            metrics.count_error("UNAUTHENTICATED")
            return html_page(login_page(target, "unknown token"), status=401,
                             headers={"WWW-Authenticate": CHALLENGE, "Cache-Control": "no-store"})
        response = RedirectResponse(target, status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(SECURE_SESSION_COOKIE if secure else SESSION_COOKIE, session,
                            max_age=SESSION_TTL_S, path="/", secure=secure, httponly=True, samesite="strict")
        return response

    @app.get("/logout", response_class=HTMLResponse, include_in_schema=False)
    def logout_form() -> Response:
        """The log-out button (a GET changes nothing: a link or a prefetch never logs anyone out)."""
        return html_page(logout_page(), headers={"Cache-Control": "no-store"})

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        """Forget the session cookie (in this browser; the session itself ends at its expiry). Only a
        POST from this server's own pages (another site's form cannot log anyone out)."""
        if not same_origin(request):
            raise CrossOrigin("a log-out form posted from another origin")
        response = RedirectResponse("/login" if auth.enabled else "/", status_code=303)
        secure = request.url.scheme == "https"
        response.delete_cookie(SECURE_SESSION_COOKIE if secure else SESSION_COOKIE, path="/", secure=secure,
                               httponly=True, samesite="strict")
        return response
