"""Bearer tokens, TLS and mTLS on real servers (sharing the session's loaded Service), on both doors:
gRPC and HTTP. Every HTTP route with no, a wrong and the right token; the dashboard's login form and
its session cookie; HTTPS with client certificates refused at the TLS layer; the server process
refusing TLS on gRPC with plain HTTP; ``--public-metrics``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palettelink.errors import InvalidRequest, Unauthenticated
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc
from server.auth import SESSION_TTL_S, TokenAuth
from server.grpc_service import TLSConfig
from server.main import PaletteLinkServer

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "tokens"
    f.write_text("# client token\ncam-1 tok-one\n\ntok-bare  # a token with no client name\n")
    monkeypatch.setenv("PALETTELINK_TOKENS", "cam-9=tok-nine, =ignored-no-client")
    auth = TokenAuth.from_sources(f)
    assert auth.enabled
    assert auth.client_for("Bearer tok-one") == "cam-1"
    assert auth.client_for("bearer tok-bare") == "client-4"
    assert auth.client_for("Bearer tok-nine") == "cam-9"
    for bad in (None, "", "Bearer", "Basic tok-one", "Bearer tok-two"):
        with pytest.raises(Unauthenticated):
            auth.client_for(bad)
    f.write_text("a b c\n")
    with pytest.raises(InvalidRequest):
        TokenAuth.from_sources(f)
    assert not TokenAuth.from_sources(None, env=None).enabled
    assert TokenAuth({}).client_for(None) == ""


def test_sessions_are_signed_by_a_token_and_expire() -> None:
    """The login cookie's value: it names its client, holds no token, and is refused once expired,
    altered, moved to another client, junk, or when its token is gone (another tokens file)."""
    auth = TokenAuth({TOKEN: "cam-1", "other-token": "cam-2"})
    now = 1_700_000_000.0
    value = auth.session_for(TOKEN, now=now)
    assert TOKEN not in value and auth.client_for_session(value, now=now + 60) == "cam-1"
    assert auth.client_for_session(auth.session_for("other-token", now=now), now=now) == "cam-2"
    with pytest.raises(Unauthenticated, match="expired"):
        auth.client_for_session(value, now=now + SESSION_TTL_S + 1)
    v, expiry, name, mac = value.split(".")
    cam2 = auth.session_for("other-token", now=now).split(".")[2]
    for bad in (f"{v}.{int(expiry) + 9999}.{name}.{mac}",  # a later expiry
                f"{v}.{expiry}.{cam2}.{mac}",  # another client's name
                f"{v}.{expiry}.{name}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
                "", "v1", "v1.1.2", "v2.1.2.3", "v1.\u00b2.x.y", "v1.9999999999.é.x",
                "v1." + "9" * 2000 + ".x.y"):
        with pytest.raises(Unauthenticated):
            auth.client_for_session(bad, now=now)
    with pytest.raises(Unauthenticated):
        auth.session_for("wrong")
    with pytest.raises(Unauthenticated):  # the token was removed from the tokens file
        TokenAuth({"other-token": "cam-2"}).client_for_session(value, now=now)
    assert TokenAuth({}).client_for_session("anything") == ""


@pytest.fixture(scope="module")
def token_server(server_service):  # noqa: ANN001, ANN201
    srv = PaletteLinkServer(server_service, auth=TokenAuth({TOKEN: "cam-1"}))
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0, close_service=False)


def test_tokens_are_enforced_on_grpc(token_server, coded_frames) -> None:  # noqa: ANN001
    with grpc.insecure_channel(token_server.grpc_address) as ch:
        stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
        req = pb.AnalyzeRequest(payload=coded_frames["bus"])
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Analyze(req, metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                stub.GetInfo(pb.GetInfoRequest(), metadata=md, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Stream(iter([pb.StreamRequest(header=pb.StreamHeader())]), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        ok = (("authorization", "Bearer s3cret"),)
        assert stub.Analyze(req, metadata=ok, timeout=30).result.boxes
        reqs = [pb.StreamRequest(header=pb.StreamHeader(client_id="door")),
                pb.StreamRequest(frame=pb.Frame(frame_id=5, payload=coded_frames["zidane"]))]
        (r,) = list(stub.Stream(iter(reqs), metadata=ok, timeout=30))
        assert r.result.frame_id == 5 and r.result.boxes
        # health stays open for probes
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    clients = {f["client"] for f in token_server.service.recent_frames(10)}
    assert {"cam-1", "cam-1/door"} <= clients


def test_tokens_are_enforced_on_rest(token_server, coded_frames) -> None:  # noqa: ANN001
    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        r = http.post("/api/analyze", content=coded_frames["bus"])
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        r = http.post("/api/analyze", content=coded_frames["bus"], headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["output"]["boxes"]
        assert http.get("/readyz").status_code == 200  # probes need no token


# Every route of the HTTP app: (method, path, the status with the right token). A test below checks
# that this list covers every route the app has, so a new route cannot slip in unprotected.
ROUTES = [
    ("GET", "/", 200), ("GET", "/frame", 200), ("GET", "/try", 200), ("GET", "/rate", 200),
    ("GET", "/docs", 200), ("GET", "/openapi.json", 200), ("GET", "/metrics", 200),
    ("GET", "/api/info", 200), ("GET", "/api/frames", 200), ("GET", "/api/frames/1/preview.jpg", 404),
    ("GET", "/api/streams", 200),
    ("GET", "/api/live", 200), ("GET", "/api/bench", 200), ("POST", "/api/try", 400),  # an empty upload
    ("POST", "/api/analyze", 200), ("GET", "/api/bundles", 200),
    ("GET", "/api/bundles/fall-yolov8/1/edge", 200),
    ("GET", "/api/bundles/fall-yolov8/1/edge/manifest.json", 200),
    ("GET", "/static/common.js", 200), ("GET", "/swagger/swagger-ui.css", 200),
    ("GET", "/no-such-page", 404),
]
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/login"), ("GET", "/logout"), ("POST", "/logout"),
        ("GET", "/favicon.ico")]
CREDENTIALS = {"none": {}, "wrong": {"authorization": "Bearer not-the-token"},
               "no-scheme": {"authorization": TOKEN}, "right": {"authorization": f"Bearer {TOKEN}"}}


def _call(http: httpx.Client, method: str, path: str, headers: dict[str, str],
          body: bytes = b"") -> httpx.Response:
    """One request; an event stream is read up to its first event, then closed."""
    with http.stream(method, path, headers=headers, content=body if method == "POST" else None) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            next(r.iter_lines())
        else:
            r.read()
        return r


def test_the_route_list_covers_the_app(token_server) -> None:  # noqa: ANN001
    from starlette.routing import Mount

    listed = [p for _, p, _ in ROUTES] + [p for _, p in OPEN]
    for route in token_server.http.config.app.routes:
        if isinstance(route, Mount):
            hit = any(p.startswith(route.path + "/") for p in listed)
        else:
            hit = any(route.path_regex.match(p) for p in listed)  # type: ignore[attr-defined]
        assert hit, f"route {route.path} is not in ROUTES: add it with the status the right token gets"


@pytest.mark.parametrize("who", list(CREDENTIALS))
@pytest.mark.parametrize(("method", "path", "status"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_http_route_needs_the_token(token_server, coded_frames, method: str, path: str,  # noqa: ANN001
                                          status: int, who: str) -> None:
    body = coded_frames["bus"] if path == "/api/analyze" else b""
    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        r = _call(http, method, path, CREDENTIALS[who], body)
    if who == "right":
        assert r.status_code == status, r.text
        return
    assert r.status_code == 401, r.text
    assert r.json()["error"]["status"] == "UNAUTHENTICATED" and r.json()["error"]["code"] == 16
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="palettelink"')
    assert ('error="invalid_token"' in challenge) == (who != "none")  # RFC 6750: only when one was sent
    assert "cam-1" not in r.text and "fall-yolov8" not in r.text  # nothing of what the routes show


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_probes_and_the_login_form_are_open(token_server, method: str, path: str) -> None:  # noqa: ANN001
    r = httpx.request(method, token_server.http_url + path, timeout=30)
    assert r.status_code in (200, 303), r.text  # /logout answers with a redirect to the form
    if path == "/readyz":
        assert r.json()["ready"] is True


def test_a_browser_page_load_goes_to_the_login_form(token_server) -> None:  # noqa: ANN001
    html_accept = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        r = http.get("/frame", params={"stream": "x"}, headers=html_accept)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fframe%3Fstream%3Dx"
        # an API call (no text/html) or a wrong token is answered, never redirected
        assert http.get("/api/info", headers={"accept": "application/json"}).status_code == 401
        assert http.get("/", headers={**html_accept, "authorization": "Bearer nope"}).status_code == 401


def test_public_metrics(server_service) -> None:  # noqa: ANN001
    srv = PaletteLinkServer(server_service, auth=TokenAuth({TOKEN: "cam-1"}), public_metrics=True)
    srv.start()
    srv.load()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as http:
            r = http.get("/metrics")
            assert r.status_code == 200 and "palettelink_ready 1.0" in r.text
            assert http.get("/api/info").status_code == 401  # only /metrics is opened
            assert http.get("/").status_code == 401
    finally:
        srv.stop(grace=0.5, close_service=False)


def test_failed_http_auth_is_counted(token_server) -> None:  # noqa: ANN001
    def denied() -> float:
        text = token_server.service.metrics.render().decode()
        m = re.search(r'^palettelink_errors_total\{status="UNAUTHENTICATED"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = denied()
    httpx.get(token_server.http_url + "/api/info", timeout=30)
    assert denied() == before + 1


# -- the dashboard's login form and its session cookie --------------------------------------------


def _login(http: httpx.Client, token: str, next_: str = "/") -> httpx.Response:
    return http.post("/login", data={"token": token, "next": next_})


def test_login_form_sets_a_session_cookie(token_server, coded_frames) -> None:  # noqa: ANN001
    url = token_server.http_url
    with httpx.Client(base_url=url, timeout=30) as http:
        form = http.get("/login", params={"next": "/frame"})
        assert form.status_code == 200 and 'name="token"' in form.text and 'value="/frame"' in form.text
        assert form.headers["cache-control"] == "no-store"

        bad = _login(http, "wrong", "/frame")
        assert bad.status_code == 401 and "unknown token" in bad.text and "set-cookie" not in bad.headers
        assert bad.headers["www-authenticate"].startswith("Bearer")
        assert not http.cookies

        r = _login(http, TOKEN, "/frame")
        assert r.status_code == 303 and r.headers["location"] == "/frame"
        cookie = r.headers["set-cookie"]
        name, value = cookie.split(";")[0].split("=", 1)
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert name == "palettelink_session" and TOKEN not in value  # the browser never holds the token
        assert {"httponly", "path", "max-age"} <= attrs and "secure" not in attrs  # plain http here
        assert re.search(r"samesite=strict", cookie, re.I) and f"Max-Age={SESSION_TTL_S}" in cookie

        # the cookie opens the pages, the JSON routes and the event stream ...
        for path in ("/", "/frame", "/docs", "/openapi.json", "/api/info", "/metrics", "/static/live.js"):
            assert http.get(path).status_code == 200, path
        assert _call(http, "GET", "/api/live", {}).status_code == 200
        assert 'id="logout"' in http.get("/").text
        # ... and writes from this server's own pages; the cookie names the client
        same = http.post("/api/analyze", params={"frame_id": 777}, content=coded_frames["bus"],
                         headers={"origin": url})
        assert same.status_code == 200
        newest = http.get("/api/frames", params={"limit": 1}).json()[0]
        assert (newest["frame_id"], newest["client"]) == (777, "cam-1")
        # a write from another site with the cookie is refused (cross-site request forgery)
        other = http.post("/api/analyze", content=coded_frames["bus"], headers={"origin": "http://evil.example"})
        assert other.status_code == 403 and other.json()["error"]["status"] == "PERMISSION_DENIED"
        assert http.post("/login", data={"token": TOKEN}, headers={"origin": "http://evil.example"}
                         ).status_code == 403

        # an altered cookie is refused like a wrong token
        altered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
        r = httpx.get(url + "/api/info", headers={"cookie": f"palettelink_session={altered}"}, timeout=30)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]

        # a GET of /logout (a link, a prefetch) only shows the button; another site's POST is refused
        page = http.get("/logout")
        assert page.status_code == 200 and 'method="post" action="/logout"' in page.text
        assert "set-cookie" not in page.headers and http.get("/api/info").status_code == 200
        evil = http.post("/logout", headers={"origin": "http://evil.example"})
        assert evil.status_code == 403 and "set-cookie" not in evil.headers
        assert http.get("/api/info").status_code == 200
        out = http.post("/logout", headers={"origin": url})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert "Max-Age=0" in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()
        assert http.get("/api/info").status_code == 401


def _csp(r: httpx.Response) -> dict[str, list[str]]:
    policy = r.headers.get("content-security-policy", "")
    return {d.split()[0]: d.split()[1:] for d in (x.strip() for x in policy.split(";")) if d}


@pytest.mark.parametrize("path", ["/", "/frame", "/try", "/rate", "/docs", "/logout", "/login?next=/try",
                                  "/static/common.js", "/static/dashboard.css", "/swagger/swagger-ui.css",
                                  "/favicon.ico", "/api/info", "/metrics", "/no-such-page"])
@pytest.mark.parametrize("logged_in", [True, False])
def test_every_response_carries_the_browser_security_headers(token_server, path: str,  # noqa: ANN001
                                                             logged_in: bool) -> None:
    """HTML, static files, JSON, errors and the login redirects: a CSP that names no other source and
    forbids framing, X-Frame-Options DENY, nosniff, a Referrer-Policy that keeps this server's own
    Origin header (the cross-origin check reads it)."""
    with httpx.Client(base_url=token_server.http_url, timeout=30,
                      headers={"accept": "text/html,*/*;q=0.8"}) as http:
        if logged_in:
            assert _login(http, TOKEN).status_code == 303
        r = http.get(path)
    if logged_in or path in ("/favicon.ico", "/logout") or path.startswith("/login"):
        assert r.status_code in (200, 404), (path, r.status_code)
    else:
        assert r.status_code in (303, 401), (path, r.status_code)  # the login form, or 401
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"
    csp = _csp(r)
    assert csp["frame-ancestors"] == ["'none'"] and csp["default-src"] == ["'self'"], csp
    assert csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"], csp
    for directive, sources in csp.items():  # nothing from another host, no inline code but by hash
        for src in sources:
            hashed = re.fullmatch(r"'sha256-[A-Za-z0-9+/=]+'", src)
            assert src in ("'self'", "'none'", "data:", "blob:") or hashed, (directive, src)
    assert "'unsafe-inline'" not in str(csp) and "'unsafe-eval'" not in str(csp)


def test_the_pages_inline_code_is_allowed_by_hash_only(token_server) -> None:  # noqa: ANN001
    """The login form's inline style and Swagger UI's inline start-up script: their sha256 in the CSP
    of their own page, nowhere else; the dashboard pages have no inline code at all."""
    import base64
    import hashlib

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        login = http.get("/login")
        (style,) = re.findall(r"<style>(.*?)</style>", login.text, re.S)
        assert _csp(login)["style-src"] == ["'self'", digest(style)]
        assert _login(http, TOKEN).status_code == 303
        docs = http.get("/docs")
        scripts = re.findall(r"<script>(.*?)</script>", docs.text, re.S)
        assert scripts and _csp(docs)["script-src"] == ["'self'", *map(digest, scripts)]
        for page in ("/", "/frame", "/try", "/rate"):
            r = http.get(page)
            assert "<style>" not in r.text and "<script>" not in r.text and " style=" not in r.text, page
            assert re.search(r"\son[a-z]+=", r.text) is None, page  # no inline event handlers
            assert _csp(r)["script-src"] == ["'self'"] and _csp(r)["style-src"] == ["'self'"]


def test_the_favicon_is_served_to_anyone(token_server) -> None:  # noqa: ANN001
    """Browsers fetch it unasked, logged in or not: an icon, never a 401 or 404; the pages name it."""
    r = httpx.get(token_server.http_url + "/favicon.ico", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.content.startswith(b"<svg")
    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        assert 'rel="icon" href="/favicon.ico"' in http.get("/login").text
        _login(http, TOKEN)
        for page in ("/", "/frame", "/try", "/rate", "/logout"):
            assert 'rel="icon" href="/favicon.ico"' in http.get(page).text, page


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example",
                                    "evil", "/login", "/" + "a" * 600])
def test_login_never_redirects_off_this_server(token_server, target: str) -> None:  # noqa: ANN001
    with httpx.Client(base_url=token_server.http_url, timeout=30) as http:
        r = _login(http, TOKEN, target)
        assert r.status_code == 303 and r.headers["location"] == "/"
        page = http.get("/login", params={"next": target})
        assert 'name="next" value="/"' in page.text


def test_login_without_tokens_just_redirects(live_server) -> None:  # noqa: ANN001
    with httpx.Client(base_url=live_server.http_url, timeout=30) as http:
        r = http.get("/login", params={"next": "/rate"})
        assert r.status_code == 303 and r.headers["location"] == "/rate"
        assert 'id="logout"' not in http.get("/").text


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=palettelink test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _info(address: str, creds: grpc.ChannelCredentials) -> pb.GetInfoResponse:
    with grpc.secure_channel(address, creds) as ch:
        return palettelink_pb2_grpc.PaletteLinkStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)


def _https(certs: Path, client_cert: bool) -> ssl.SSLContext:
    """A client context that trusts the test CA, presenting the client certificate when asked."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(certs / "client.pem", certs / "client.key")
    return ctx


def _refused_at_tls(port: int, certs: Path) -> None:
    """Without a client certificate no HTTP byte comes back: over TLS 1.2 the handshake itself fails;
    over TLS 1.3 (whose client finishes first) the server aborts before reading the request."""
    ctx = _https(certs, client_cert=False)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    ctx = _https(certs, client_cert=False)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                answer = tls.recv(100)
            except (ssl.SSLError, ConnectionResetError):
                answer = b""
    assert answer == b"", answer


def test_tls_and_mtls(server_service, certs: Path) -> None:  # noqa: ANN001
    ca = (certs / "ca.pem").read_bytes()
    client_key, client_cert = (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    tls = TLSConfig(certs / "server.pem", certs / "server.key")
    srv = PaletteLinkServer(server_service, tls=tls)  # HTTP follows gRPC: https with the same certificate
    srv.start()
    srv.load()
    try:
        assert _info(srv.grpc_address, grpc.ssl_channel_credentials(ca)).bundles
        with grpc.insecure_channel(srv.grpc_address) as ch, pytest.raises(grpc.RpcError):
            palettelink_pb2_grpc.PaletteLinkStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
        assert srv.http_url.startswith("https://")
        assert httpx.get(srv.http_url + "/api/info", verify=_https(certs, False), timeout=30).json()["ready"]
        with pytest.raises(httpx.TransportError):  # plain http to the https port
            httpx.get(srv.http_url.replace("https://", "http://") + "/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(srv.http_url + "/healthz", timeout=10)
    finally:
        srv.stop(grace=0.5, close_service=False)

    srv = PaletteLinkServer(server_service, tls=TLSConfig(tls.cert, tls.key, certs / "ca.pem"),
                            auth=TokenAuth({TOKEN: "cam-1"}))
    srv.start()
    srv.load()
    try:
        with pytest.raises(grpc.RpcError) as e:  # no client certificate: the handshake fails
            _info(srv.grpc_address, grpc.ssl_channel_credentials(ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(ca, client_key, client_cert)
        with grpc.secure_channel(srv.grpc_address, creds) as ch:
            stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
            assert stub.GetInfo(pb.GetInfoRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                timeout=10).bundles
        # HTTP: the same client-certificate check, at the TLS layer, the probes included
        _refused_at_tls(srv.http_port, certs)
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.http_url + "/healthz", verify=_https(certs, False), timeout=10)
        with httpx.Client(base_url=srv.http_url, verify=_https(certs, True), timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/api/info").status_code == 401  # a certificate is not a token
            assert http.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
            r = _login(http, TOKEN)  # over https the cookie is Secure and __Host- prefixed
            assert r.status_code == 303
            cookie = r.headers["set-cookie"]
            assert cookie.startswith("__Host-palettelink_session=") and "; secure" in cookie.lower()
            assert http.get("/api/frames").status_code == 200
    finally:
        srv.stop(grace=0.5, close_service=False)

    srv = PaletteLinkServer(server_service, tls=tls, http_tls=False)  # what --http-insecure asks for
    srv.start()
    try:
        assert srv.http_url.startswith("http://") and httpx.get(srv.http_url + "/healthz").status_code == 200
    finally:
        srv.stop(grace=0.5, close_service=False)


# -- the server process: flags, the refusal to start half secured ---------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PALETTELINK_TOKENS", "PALETTELINK_TOKEN")}


def _server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server.main", "--grpc-port", "0", "--http-port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout)


@pytest.mark.parametrize(("extra", "says"), [
    ([], ["--http-tls", "--http-insecure", "plain"]),
    (["--tls-client-ca", "CA"], ["--http-tls", "--http-insecure", "--tls-client-ca"]),
    (["--http-tls", "--http-insecure"], ["contradict"]),
])
def test_tls_on_grpc_with_plain_http_is_refused_at_start(certs: Path, tmp_path: Path, extra: list[str],
                                                         says: list[str]) -> None:
    extra = [str(certs / "ca.pem") if a == "CA" else a for a in extra]
    r = _server("--bundles", str(tmp_path), "--tls-cert", str(certs / "server.pem"), "--tls-key",
                str(certs / "server.key"), *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palettelink-server: "), r.stderr
    assert all(w in lines[0] for w in says), lines[0]
    assert "Traceback" not in r.stderr and "LISTENING" not in r.stdout


def test_http_insecure_starts_with_a_warning(certs: Path, tmp_path: Path) -> None:
    """Plain HTTP beside gRPC TLS when asked for (a proxy terminates TLS): the flags pass, a warning
    says what travels in clear (the empty bundles root then stops it before it listens, exit 2)."""
    r = _server("--bundles", str(tmp_path), "--tls-cert", str(certs / "server.pem"), "--tls-key",
                str(certs / "server.key"), "--http-insecure")
    assert r.returncode == 2 and "no usable bundle" in r.stderr and "LISTENING " not in r.stdout, r.stderr
    assert "HTTP is plain while gRPC uses TLS" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def secured_process(bundles_root: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory,
                    server_process) -> Iterator[dict[str, str]]:  # noqa: ANN001
    """``palettelink-server`` with tokens, mTLS on both ports (``--http-tls``) and ``--public-metrics``;
    yields its READY line's fields, stopped with SIGTERM (it must exit 0)."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# client token\ncam-7 {TOKEN}\n")
    cmd = [sys.executable, "-m", "server.main", "--bundles", str(bundles_root), "--grpc-port", "0",
           "--http-port", "0", "--no-verify", "--tokens-file", str(tokens),
           "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
           "--tls-client-ca", str(certs / "ca.pem"), "--http-tls",
           "--public-metrics", "--log-level", "warning"]
    with server_process(cmd, _env(), REPO) as fields:
        yield fields


def test_the_process_secures_both_doors(secured_process: dict[str, str], certs: Path) -> None:
    assert {"tls", "mtls", "auth", "https", "http-mtls"} <= set(secured_process), secured_process
    url = f"https://{secured_process['http']}"
    _refused_at_tls(int(secured_process["http"].rsplit(":", 1)[1]), certs)
    with httpx.Client(base_url=url, verify=_https(certs, True), timeout=30) as http:
        assert http.get("/readyz").status_code == 200
        assert http.get("/metrics").status_code == 200  # --public-metrics
        for path in ("/", "/api/info", "/api/frames", "/docs", "/openapi.json"):
            r = http.get(path)
            assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED", path
        info = http.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"})
        assert info.status_code == 200 and info.json()["ready"]
