"""The dashboard's server side over a real uvicorn: pages and their local assets, per-stream stats over
SSE, Try it (good uploads and every kind of bad one), the bench curves, offline /docs and the typed
OpenAPI schema. The browser side is tests/test_dashboard_browser.py; the image bundle's tasks and
previews are tests/test_dashboard_tasks.py."""

from __future__ import annotations

import io
import json
import re
import threading

import grpc
import httpx
import pytest
from helpers import blank_png

from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc


@pytest.fixture()
def http(live_server):  # noqa: ANN001, ANN201
    with httpx.Client(base_url=live_server.http_url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path", ["/", "/frame", "/try", "/rate"])
def test_pages_use_only_local_assets(http: httpx.Client, path: str) -> None:
    page = http.get(path)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and not [r for r in refs if "//" in r], refs  # nothing from another host
    for ref in refs:
        if ref.startswith("/static/"):
            assert http.get(ref).status_code == 200, ref


def test_open_stream_stats_over_sse(http: httpx.Client, live_server, coded_frames) -> None:  # noqa: ANN001
    """A stream held open after 3 answered frames shows up with its rates, levels and last frame's boxes;
    after it closes it is listed as closed."""
    answered, release = threading.Semaphore(0), threading.Event()

    def reqs():  # noqa: ANN202
        yield pb.StreamRequest(header=pb.StreamHeader(bundle="fall-yolov8", client_id="dash-sse"))
        for i in range(3):
            yield pb.StreamRequest(frame=pb.Frame(frame_id=i + 1, payload=coded_frames["bus"]))
        release.wait(30)

    with grpc.insecure_channel(live_server.grpc_address) as ch:
        stub = palettelink_pb2_grpc.PaletteLinkStub(ch)
        call = stub.Stream(reqs(), timeout=60)
        got = []

        def read() -> None:
            for r in call:
                got.append(r)
                answered.release()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        for _ in range(3):
            assert answered.acquire(timeout=60)
        with http.stream("GET", "/api/live") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    break
        (s,) = [s for s in data["open"] if s["client"] == "dash-sse"]
        assert s["frames"] == 3 and s["codec"] == "baseline" and s["level"] == 4
        assert s["fps"] > 0 and s["kbps"] > 0 and 0 < s["latency_p50_ms"] <= s["latency_p95_ms"]
        assert len(s["series"]["kbit"]) == 3 and s["series"]["level"] == [4, 4, 4]
        last = s["last"]
        assert last["frame_id"] == 3 and (last["width"], last["height"]) == (810, 1080)
        assert len(last["boxes"]) >= 3 and {"x1", "y2", "class_name", "score"} <= set(last["boxes"][0])
        release.set()
        t.join(30)
    closed = http.get("/api/streams").json()["closed"]
    assert any(c["id"] == s["id"] and c["closed"] for c in closed)


def test_feature_frames_have_no_preview(http: httpx.Client, coded_frames) -> None:  # noqa: ANN001
    """A feature bundle rebuilds no picture: asking for one stores nothing, and its URL is a 404 in the
    error JSON. (The image bundle's previews: tests/test_dashboard_tasks.py.)"""
    r = http.post("/api/analyze", params={"want_preview": "true", "frame_id": 4243},
                  content=coded_frames["bus"])
    assert r.status_code == 200 and r.json()["output"]["preview_jpeg"] == 0
    (f,) = [f for f in http.get("/api/frames").json() if f["frame_id"] == 4243]
    assert f["key"] > 0 and f["preview"] is False and "preview_url" not in f
    assert f["masks"] == 0 and f["landmarks"] == 0
    gone = http.get(f"/api/frames/{f['key']}/preview.jpg")
    assert gone.status_code == 404 and gone.json()["error"]["status"] == "NOT_FOUND"
    page = http.get("/frame").text
    assert "want_preview" in page and "future generator" not in page


def test_try_it(http: httpx.Client, images) -> None:  # noqa: ANN001
    data = images[0].read_bytes()
    r = http.post("/api/try", params={"bundle": "fall-yolov8", "codec": "baseline", "level": 3}, content=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (810, 1080) and body["image_bytes"] == len(data)
    res, ref = body["result"], body["reference"]
    assert (res["codec"], res["level"]) == ("baseline", 3) and (ref["codec"], ref["level"]) == ("baseline", 8)
    assert 0 < res["bytes"] < ref["bytes"] and res["bpp"] == pytest.approx(8 * res["bytes"] / (810 * 1080))
    assert len(ref["boxes"]) >= 3 and res["boxes"]
    frames = http.get("/api/frames", params={"limit": 2}).json()
    assert {f["client"] for f in frames} == {"dashboard:try"}


def test_try_it_default_codec_and_level(http: httpx.Client, images, bundle) -> None:  # noqa: ANN001
    from palettelink import codecs

    r = http.post("/api/try", content=images[1].read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["result"]["codec"] == codecs.default_codec(bundle)


def test_try_it_target_bpp(http: httpx.Client, images) -> None:  # noqa: ANN001
    """The edge's rate control picks the finest level within the target; below the coarsest, a warning."""
    data = images[0].read_bytes()
    r = http.post("/api/try", params={"codec": "baseline", "target_bpp": 5.0}, content=data).json()["result"]
    assert r["level"] == 4 and r["bpp"] <= 5.0 and r["target_bpp"] == 5.0 and r["warning"] is None
    r = http.post("/api/try", params={"codec": "baseline", "target_bpp": 0.01}, content=data).json()["result"]
    assert r["level"] == 2 and "below the coarsest level" in r["warning"]


@pytest.mark.parametrize(("params", "content", "status", "needle"), [
    ({}, b"definitely not an image", 400, "not an image"),
    ({}, b"", 400, "empty upload"),
    ({}, blank_png(9000, 9000), 413, "9000x9000"),  # a bomb: more pixels than the server's limit
    ({}, blank_png(8192, 8192), 413, "--try-max-pixels"),  # within the frame limit, over the upload budget
    ({}, blank_png(20000, 8), 413, "at most"),  # wider than a frame can carry
    ({}, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "not an image"),  # a broken header
    ({"bundle": "nope"}, b"x", 404, "no bundle"),
    ({"codec": "jpeg"}, b"x", 400, "not 'jpeg'"),
    ({"codec": "baseline", "level": 1}, None, 400, "not 1"),
    ({"level": -1}, b"x", 400, "level"),
    ({"task": "segment"}, b"x", 400, "segment"),
    ({"level": 3, "target_bpp": 1}, b"x", 400, "not both"),
    ({"target_bpp": 0}, b"x", 400, "target_bpp"),
])
def test_try_it_refuses_bad_input(http: httpx.Client, images, params, content,  # noqa: ANN001
                                  status: int, needle: str) -> None:
    r = http.post("/api/try", params=params, content=images[0].read_bytes() if content is None else content)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["status"] and err["code"]
    assert http.get("/healthz").status_code == 200  # the server keeps running


def test_try_it_admits_uploads_before_reading_them(live_server, http: httpx.Client, images) -> None:  # noqa: ANN001
    """--max-try-uploads (2): while two uploads are being sent (their bodies held back), a third is
    refused at once, 429 with Retry-After and the flag named, without its body being read; then the
    two finish and the next one is answered."""
    from server.dashboard import TRY_UPLOADS

    assert TRY_UPLOADS == 2
    data = images[0].read_bytes()
    go = threading.Event()
    answers: list[int] = []

    def slow_body():  # noqa: ANN202
        yield data[:100]
        go.wait(60)
        yield data[100:]

    def upload() -> None:
        with httpx.Client(base_url=live_server.http_url, timeout=120) as c:
            answers.append(c.post("/api/try", params={"codec": "baseline", "level": 3},
                                  content=slow_body()).status_code)

    try_it = live_server.http.config.app.state.try_it
    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(600):  # until both hold their turn
            if try_it.in_flight == 2:
                break
            go.wait(0.05)
        r = http.post("/api/try", content=data)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["status"] == "RESOURCE_EXHAUSTED" and "--max-try-uploads" in err["message"]
        assert int(r.headers["retry-after"]) >= 1 and "retry after" in err["message"]
    finally:
        go.set()
        for t in threads:
            t.join(120)
    assert answers == [200, 200]
    assert http.post("/api/try", params={"codec": "baseline", "level": 3}, content=data).status_code == 200
    text = http.get("/metrics").text
    assert re.search(r'palettelink_frames_refused_total\{reason="try_uploads"\} [1-9]', text)


def test_try_it_body_limit(http: httpx.Client) -> None:
    r = http.post("/api/try", content=io.BytesIO(bytes((16 << 20) + 1)).read())
    assert r.status_code == 413 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_bench_curves(http: httpx.Client) -> None:
    body = http.get("/api/bench").json()
    assert body["source"] == "bench-eval.json" and body["bundle"] == "fall-yolov8/1"
    methods = {c["method"]: c["points"] for c in body["curves"]}
    assert {"baseline", "palette", "jpeg"} <= set(methods)
    for pts in methods.values():
        assert [p["bpp"] for p in pts] == sorted(p["bpp"] for p in pts) and all(p["bpp"] > 0 for p in pts)


def test_bench_json_flag(server_service, tmp_path) -> None:  # noqa: ANN001
    from server.main import PaletteLinkServer, build_parser

    assert build_parser().parse_args(["--bench-json", "x.json"]).bench_json.name == "x.json"
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"bundle": "b/1", "rows": [
        {"method": "m", "bpp": 0.5, "ap50": 0.9}, {"method": "m", "bpp": 0.1, "ap50": 0.5}]}))
    srv = PaletteLinkServer(server_service, bench_json=path)
    srv.start()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as c:
            (curve,) = c.get("/api/bench").json()["curves"]
            assert [p["bpp"] for p in curve["points"]] == [0.1, 0.5]
            path.unlink()
            r = c.get("/api/bench")
            assert r.status_code == 503 and "no bench results" in r.json()["error"]["message"]
    finally:
        srv.stop(grace=1.0, close_service=False)


def test_docs_work_offline(http: httpx.Client) -> None:
    page = http.get("/docs").text
    refs = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page)
    assert "/swagger/swagger-ui-bundle.js" in refs and "/swagger/swagger-ui.css" in refs
    assert not [r for r in refs if "//" in r], refs
    for ref in ("/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css"):
        r = http.get(ref)
        assert r.status_code == 200 and len(r.content) > 10_000


def test_openapi_types_the_json_apis(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    for path, model in [("/api/info", "InfoModel"), ("/api/streams", "StreamsModel"),
                        ("/api/try", "TryModel"), ("/api/bench", "BenchModel"),
                        ("/api/analyze", "AnalyzeModel"), ("/api/bundles", "BundlesModel"),
                        ("/api/bundles/{name}/{version}/edge", "EdgeListingModel")]:
        op = spec["paths"][path].get("get") or spec["paths"][path]["post"]
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(f"/{model}"), (path, schema)
    frames = spec["paths"]["/api/frames"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert frames["items"]["$ref"].endswith("/FrameSummaryModel")
    assert "StreamStatsModel" in spec["components"]["schemas"]


def test_the_result_models_are_made_from_the_result_types() -> None:
    """One definition of each field: a frame's results and GetInfo's bundle description are the
    server's dataclasses; their response models follow them field by field, in their order."""
    from dataclasses import fields

    from server import api_models as m
    from server import info, results

    for cls, model in [(results.FrameResult, m.AnalyzeModel), (results.TaskOutput, m.TaskOutputModel),
                       (results.Timings, m.TimingsModel), (results.Box, m.BoxModel),
                       (results.Mask, m.MaskModel), (results.LandmarkSet, m.LandmarksModel),
                       (info.BundleInfo, m.BundleModel), (info.CodecInfo, m.CodecModel),
                       (info.LevelInfo, m.LevelModel), (info.TensorInfo, m.TensorModel)]:
        assert list(model.model_fields) == [f.name for f in fields(cls)], model.__name__
