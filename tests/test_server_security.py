"""Bearer tokens, TLS and mTLS on real servers (sharing the session's loaded Service)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palettelink.errors import InvalidRequest, Unauthenticated
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc
from server.auth import TokenAuth
from server.grpc_service import TLSConfig
from server.main import PaletteLinkServer


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


@pytest.fixture(scope="module")
def token_server(server_service):  # noqa: ANN001, ANN201
    srv = PaletteLinkServer(server_service, auth=TokenAuth({"s3cret": "cam-1"}))
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


def test_tls_and_mtls(server_service, certs: Path) -> None:  # noqa: ANN001
    ca = (certs / "ca.pem").read_bytes()
    client_key, client_cert = (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    tls = TLSConfig(certs / "server.pem", certs / "server.key")
    srv = PaletteLinkServer(server_service, tls=tls)
    srv.start()
    srv.load()
    try:
        assert _info(srv.grpc_address, grpc.ssl_channel_credentials(ca)).bundles
        with grpc.insecure_channel(srv.grpc_address) as ch, pytest.raises(grpc.RpcError):
            palettelink_pb2_grpc.PaletteLinkStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
    finally:
        srv.stop(grace=0.5, close_service=False)

    srv = PaletteLinkServer(server_service, tls=TLSConfig(tls.cert, tls.key, certs / "ca.pem"))
    srv.start()
    srv.load()
    try:
        with pytest.raises(grpc.RpcError) as e:  # no client certificate: the handshake fails
            _info(srv.grpc_address, grpc.ssl_channel_credentials(ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _info(srv.grpc_address, grpc.ssl_channel_credentials(ca, client_key, client_cert)).bundles
    finally:
        srv.stop(grace=0.5, close_service=False)
