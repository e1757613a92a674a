"""Hardening through the real gRPC server and HTTP app on 127.0.0.1 (issue 10): client bytes that made
the coder raise a bare exception, client strings that were stored and echoed at any length, and HTTP
errors outside the project's JSON error shape.

Bad frames are real frames (the baseline fixture and a palette frame from the session bundle) with one
thing spoiled and the container re-packed, so only the spoiled part is wrong."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import grpc
import httpx
import pytest

from palettelink import bitstream
from palettelink.v1 import palettelink_pb2 as pb

BUNDLE = "fall-yolov8"
MiB = 1 << 20


def zero_last_word(payload: bytes, layer: int) -> bytes:
    """``payload`` with the last 32-bit word of one layer's entropy-coded bytes set to zero (the coded
    words end every layer of both codecs); the container stays valid."""
    f = bitstream.unpack(payload)
    data = f.layers[layer]
    assert len(data) >= 4 and data[-4:] != bytes(4)
    layers = (*f.layers[:layer], data[:-4] + bytes(4), *f.layers[layer + 1:])
    return bitstream.pack(dataclasses.replace(f, layers=layers))


@pytest.fixture(scope="module")
def palette_frame(bundle, images: list[Path]) -> bytes:  # noqa: ANN001
    """bus.jpg through the session bundle's trained palette codec at its finest level (every layer)."""
    from palettelink.codecs import available, make_encoder
    from palettelink.image import load_image

    if "palette" not in available(bundle):
        pytest.skip("this bundle has no trained palette codec (assets/codecs/fall-yolov8 not built yet)")
    return make_encoder(bundle, "palette").encode(load_image(images[0]), 0).payload


def stream(stub, header: pb.StreamHeader, payloads: list[bytes]) -> list[pb.FrameResult]:  # noqa: ANN001
    reqs = [pb.StreamRequest(header=header)] + [
        pb.StreamRequest(frame=pb.Frame(frame_id=i, payload=p)) for i, p in enumerate(payloads)]
    return [r.result for r in stub.Stream(iter(reqs), timeout=120)]


# -- 1. client bytes never reach INTERNAL --------------------------------------------------------


@pytest.mark.parametrize("codec", ["baseline", "palette"])
def test_zero_last_word_is_invalid_argument_via_analyze_and_stream(
        grpc_stub, coded_frames, palette_frame, codec: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    good = coded_frames["bus"] if codec == "baseline" else palette_frame
    n_layers = len(bitstream.unpack(good).layers)
    bad = [zero_last_word(good, i) for i in range(n_layers)]
    with caplog.at_level(logging.ERROR, "palettelink.server"):
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=bad[-1]), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "zero word" in e.value.details()
        ok = grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=good), timeout=120).result
        assert not ok.HasField("error") and ok.codec == codec and ok.boxes

        out = stream(grpc_stub, pb.StreamHeader(bundle=BUNDLE, client_id="zero-word"), [*bad, good])
    assert [r.frame_id for r in out] == list(range(n_layers + 1))
    for i, r in enumerate(out[:-1]):
        assert r.error.status == "INVALID_ARGUMENT", (i, r.error)
        assert "zero word" in r.error.message and not r.boxes
    assert not out[-1].HasField("error") and out[-1].codec == codec
    assert [(b.class_id, round(b.score, 3)) for b in out[-1].boxes] == \
        [(b.class_id, round(b.score, 3)) for b in ok.boxes]
    assert "unexpected error" not in caplog.text  # no traceback: nothing went the INTERNAL way


# -- 2. client strings are bounded before they are stored or echoed ------------------------------

HUGE = "b" * MiB
SHORT = 500  # characters: any error about a name must stay this short, whatever the name's length


def _bounded(entry: object, limit: int = 300) -> None:
    """Every string in a /api/frames entry is short."""
    if isinstance(entry, str):
        assert len(entry) <= limit, entry[:80]
    elif isinstance(entry, dict):
        for v in entry.values():
            _bounded(v, limit)
    elif isinstance(entry, list):
        for v in entry:
            _bounded(v, limit)


def test_megabyte_names_are_refused_short_and_not_stored(grpc_stub, live_server, coded_frames) -> None:  # noqa: ANN001
    payload = coded_frames["bus"]
    for req in (pb.AnalyzeRequest(bundle=HUGE, payload=payload),
                pb.AnalyzeRequest(bundle=BUNDLE, task=HUGE, payload=payload),
                pb.AnalyzeRequest(bundle="n" * 128, payload=payload)):  # at the limit: looked up, not found
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Analyze(req, timeout=60)
        assert e.value.code().name in ("INVALID_ARGUMENT", "NOT_FOUND"), e.value.details()
        assert 0 < len(e.value.details()) <= SHORT
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for header in (pb.StreamHeader(bundle=HUGE), pb.StreamHeader(bundle=BUNDLE, task=HUGE),
                   pb.StreamHeader(bundle=BUNDLE, client_id=HUGE)):
        with pytest.raises(grpc.RpcError) as e:
            stream(grpc_stub, header, [payload])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "longer than 128" in e.value.details() and len(e.value.details()) <= SHORT
    with httpx.Client(base_url=live_server.http_url, timeout=60) as http:
        r = http.post("/api/analyze", params={"bundle": "q" * 8000}, content=payload)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["status"] == "INVALID_ARGUMENT" and len(err["message"]) <= SHORT
        recent = http.get("/api/frames", params={"limit": 1000}).json()
        info = http.get("/api/info").json()
    _bounded(recent)
    _bounded(info["streams"])
    assert len(json.dumps(recent[:5])) < 5 * 2000
    ok = grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=payload), timeout=120).result
    assert ok.boxes  # and the server still answers


def test_a_long_client_id_is_fine_up_to_the_limit(grpc_stub, live_server, coded_frames) -> None:  # noqa: ANN001
    name = "c" * 128
    out = stream(grpc_stub, pb.StreamHeader(bundle=BUNDLE, client_id=name), [coded_frames["zidane"]])
    assert not out[0].HasField("error") and out[0].boxes
    with httpx.Client(base_url=live_server.http_url, timeout=30) as http:
        assert http.get("/api/frames", params={"limit": 1}).json()[0]["client"] == name


# -- 3. HTTP errors in the project's one JSON shape; the pixel limit from the header, 413 -------------


@pytest.fixture()
def http(live_server):  # noqa: ANN001, ANN201
    with httpx.Client(base_url=live_server.http_url, timeout=60) as c:
        yield c


def assert_error_shape(r: httpx.Response, http_status: int, name: str) -> str:
    assert r.status_code == http_status, r.text
    body = r.json()
    assert set(body) == {"error"}, body  # never FastAPI's {"detail": ...}
    err = body["error"]
    assert err["status"] == name and err["code"] == getattr(grpc.StatusCode, name).value[0]
    assert err["message"] and len(err["message"]) <= SHORT
    return str(err["message"])


@pytest.mark.parametrize(("method", "url", "params", "status", "name", "says"), [
    ("GET", "/api/frames", {"limit": "abc"}, 400, "INVALID_ARGUMENT", "limit"),
    ("GET", "/api/frames", {"limit": "5000"}, 400, "INVALID_ARGUMENT", "1000"),
    ("GET", "/api/frames", {"limit": "-1"}, 400, "INVALID_ARGUMENT", "limit"),
    ("POST", "/api/analyze", {"frame_id": "seven"}, 400, "INVALID_ARGUMENT", "frame_id"),
    ("POST", "/api/analyze", {"want_preview": "perhaps"}, 400, "INVALID_ARGUMENT", "want_preview"),
    ("GET", "/no/such/page", {}, 404, "NOT_FOUND", "/no/such/page"),
    ("DELETE", "/api/frames", {}, 405, "UNIMPLEMENTED", "DELETE"),
])
def test_framework_refusals_use_the_project_error_shape(http: httpx.Client, method: str, url: str,
                                                        params: dict[str, str], status: int, name: str,
                                                        says: str) -> None:
    r = http.request(method, url, params=params, content=b"x" if method == "POST" else None)
    assert says in assert_error_shape(r, status, name)


def test_a_long_unknown_path_is_echoed_short(http: httpx.Client) -> None:
    msg = assert_error_shape(http.get("/" + "p" * 6000), 404, "NOT_FOUND")
    assert "…" in msg


def test_pixel_limit_is_413_and_checked_from_the_header(http: httpx.Client, grpc_stub, coded_frames) -> None:  # noqa: ANN001
    """A header declaring 16384² pixels is refused before decoding: its layer is also broken (a zero
    last word), and the answer is still the size, not the broken layer."""
    good = coded_frames["bus"]
    f = bitstream.unpack(good)
    big = bitstream.pack(dataclasses.replace(f, image_size=(16384, 16384)))
    big_and_broken = zero_last_word(big, 0)
    for payload in (big, big_and_broken):
        r = http.post("/api/analyze", params={"bundle": BUNDLE}, content=payload)
        msg = assert_error_shape(r, 413, "RESOURCE_EXHAUSTED")
        assert "16384x16384" in msg and "pixels" in msg
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Analyze(pb.AnalyzeRequest(bundle=BUNDLE, payload=payload), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "16384x16384" in e.value.details()
    assert http.get("/api/frames", params={"limit": 1}).json()[0]["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert http.post("/api/analyze", params={"bundle": BUNDLE}, content=good).status_code == 200
