"""The HTTP side: probes, Prometheus metrics, JSON status, dashboard, REST analyze — over a real
uvicorn on a 127.0.0.1 port, sharing its Service with the gRPC server."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none yet)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture()
def http(live_server):  # noqa: ANN001, ANN201
    with httpx.Client(base_url=live_server.http_url, timeout=30) as c:
        yield c


def test_probes(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "draining": False, "bundles": ["fall-yolov8/1"]}


def test_info_json(http: httpx.Client, bundle) -> None:  # noqa: ANN001
    info = http.get("/api/info").json()
    assert info["ready"] is True and info["device"] == "cpu"
    (b,) = info["bundles"]
    assert b["name"] == bundle.name and b["table_hash"] == bundle.table_hash_hex
    from palettelink.codecs import available

    assert [c["name"] for c in b["codecs"]] == available(bundle)  # the manifest's and those of any front
    assert info["load_errors"] == {}


def test_metrics_move_with_traffic(http: httpx.Client, live_server, coded_frames) -> None:  # noqa: ANN001
    before = http.get("/metrics").text
    with grpc.insecure_channel(live_server.grpc_address) as ch:
        stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
        reqs = [pb.StreamRequest(header=pb.StreamHeader(bundle="fall-yolov8", client_id="m"))] + [
            pb.StreamRequest(frame=pb.Frame(frame_id=i, payload=p, edge_front_ms=40, edge_encode_ms=4))
            for i, p in enumerate([coded_frames["bus"], b"garbage", coded_frames["zidane"]])
        ]
        out = [r.result for r in stub.Stream(iter(reqs), timeout=60)]
    assert [bool(r.HasField("error")) for r in out] == [False, True, False]
    after = http.get("/metrics").text
    labels = {"bundle": "fall-yolov8/1", "codec": "baseline", "level": "4"}
    assert metric(after, "palettelink_frames_received_total", **labels) == \
        metric(before, "palettelink_frames_received_total", **labels) + 2
    assert metric(after, "palettelink_bytes_received_total", **labels) == \
        metric(before, "palettelink_bytes_received_total", **labels) + len(coded_frames["bus"]) \
        + len(coded_frames["zidane"])
    assert metric(after, "palettelink_errors_total", status="INVALID_ARGUMENT") == \
        metric(before, "palettelink_errors_total", status="INVALID_ARGUMENT") + 1
    for h in ("decode_seconds", "task_seconds", "queue_seconds", "frame_seconds", "edge_front_seconds",
              "batch_size"):
        assert metric(after, f"palettelink_{h}_count") > metric(before, f"palettelink_{h}_count"), h
    assert "palettelink_active_streams 0.0" in after
    assert metric(after, "palettelink_bundles_loaded") == 1


def test_recent_frames_and_dashboard(http: httpx.Client, coded_frames) -> None:  # noqa: ANN001
    r = http.post("/api/analyze", params={"bundle": "fall-yolov8", "frame_id": 4242},
                  content=coded_frames["bus"], headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    body = r.json()
    assert body["frame_id"] == 4242 and body["codec"] == "baseline" and len(body["output"]["boxes"]) >= 3
    newest = http.get("/api/frames", params={"limit": 5}).json()[0]
    assert newest["frame_id"] == 4242 and newest["boxes"] == len(body["output"]["boxes"])
    assert newest["bpp"] == pytest.approx(body["bpp"]) and "error" not in newest
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "PaletteLink" in page.text and 'id="frames"' in page.text
    assert "api/frames" in http.get("/static/live.js").text


@pytest.mark.parametrize(("params", "content", "status", "name"), [
    ({"bundle": "fall-yolov8"}, b"PLNK-not-really", 400, "INVALID_ARGUMENT"),
    ({"bundle": "nope"}, b"x", 404, "NOT_FOUND"),
    ({"bundle": "fall-yolov8", "task": "segment"}, b"x", 400, "INVALID_ARGUMENT"),
])
def test_rest_errors_use_the_one_mapping(http: httpx.Client, params: dict[str, str], content: bytes,
                                         status: int, name: str) -> None:
    r = http.post("/api/analyze", params=params, content=content)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["status"] == name and err["code"] == getattr(grpc.StatusCode, name).value[0] and err["message"]
    errs = http.get("/api/frames", params={"limit": 1}).json()[0]
    assert errs["error"]["status"] == name


def test_rest_body_limit(http: httpx.Client) -> None:
    r = http.post("/api/analyze", content=bytes((16 << 20) + 1))
    assert r.status_code == 413 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"  # too large, not 429


def test_not_ready_until_loaded(bundles_root, coded_frames) -> None:  # noqa: ANN001
    """Before the bundles are loaded: /readyz 503, health NOT_SERVING, Analyze UNAVAILABLE."""
    from server.main import PaletteLinkServer
    from server.service import Service

    srv = PaletteLinkServer(Service(bundles_root, warmup=False))
    srv.start()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as http, \
                grpc.insecure_channel(srv.grpc_address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
            assert http.get("/healthz").status_code == 200
            assert http.get("/readyz").status_code == 503
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub.Analyze(pb.AnalyzeRequest(payload=coded_frames["bus"]), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            srv.load()
            assert http.get("/readyz").status_code == 200
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert stub.Analyze(pb.AnalyzeRequest(payload=coded_frames["bus"]), timeout=30).result.boxes
    finally:
        srv.stop(grace=1.0)


LONG = "x" * 5000


@pytest.mark.parametrize(("method", "path", "params"), [
    ("POST", "/api/analyze", {"bundle": LONG}),
    ("POST", "/api/analyze", {"bundle": "fall-yolov8", "task": LONG}),
    ("POST", "/api/analyze", {"frame_id": "9" * 40}),  # past the protocol's uint64
    ("POST", "/api/try", {"bundle": LONG}),
    ("POST", "/api/try", {"task": LONG}),
    ("POST", "/api/try", {"codec": LONG}),
    ("GET", f"/api/bundles/{LONG}/1/edge", {}),
    ("GET", f"/api/bundles/fall-yolov8/{LONG}/edge", {}),
    ("GET", f"/api/bundles/fall-yolov8/1/edge/{LONG}", {}),
    ("GET", f"/{LONG}", {}),  # an unknown route
], ids=["analyze-bundle", "analyze-task", "analyze-frame-id", "try-bundle", "try-task", "try-codec",
        "edge-name", "edge-version", "edge-file", "unknown-route"])
def test_client_strings_are_bounded_before_echo_or_storage(http: httpx.Client, method: str, path: str,
                                                           params: dict[str, str]) -> None:
    """A long name is refused (4xx) with a message that quotes at most its start, and what the
    recent-frames list keeps of it is bounded too."""
    r = http.request(method, path, params=params, content=b"x" if method == "POST" else None)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["status"] in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert len(err["message"]) <= 300 and LONG not in err["message"] and "9" * 40 not in err["message"]
    for f in http.get("/api/frames", params={"limit": 20}).json():
        assert len(f["client"]) <= 257 and len(f.get("bundle", "")) <= 128 and len(f.get("task", "")) <= 128
        assert len(f.get("error", {}).get("message", "")) <= 300
