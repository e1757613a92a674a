"""What the dashboard shows of the image bundle's tasks, over a real server (gRPC + uvicorn): the
preview store (only pictures somebody asked for, served as JPEG, evicted by its bounds, 404 in the
error JSON when gone), masks and landmark sets in the frame JSON (``/api/streams``' last frame, the
counts in ``/api/frames``), and Try it with a task and a preview. The browser side is in
tests/test_dashboard_browser.py, which reuses :func:`image_root` and :func:`image_service`.

The image bundle is built from the committed image codec (assets/codecs/image-512) when it exists,
else from a tiny codec trained here in about a minute (``train --image-codec --tiny``). A tiny codec's
picture is noise on which the task models find nothing, so :class:`KnownResults` adds a known mask,
face and pose wherever a runner returned none: these tests check the dashboard's plumbing; the models'
own results are tests/test_tasks.py's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import grpc
import httpx
import numpy as np
import pytest

from palettelink import rle
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
IMAGE_CODEC = REPO / "assets" / "codecs" / "image-512"
IMAGE = "vision-image"
PREVIEW_FRAMES = 3  # this module's server keeps 3 previews, so eviction is seen after 4 frames


# -- the image bundle and a server over it (shared with tests/test_dashboard_browser.py) -----------


def image_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A bundles root holding vision-image/1, built once per session (the folder is the cache), and
    which codec it got: ``"committed"`` (assets/codecs/image-512) or ``"tiny"`` (trained here)."""
    from palettelink.train.build_bundle import build_image_bundle

    base = tmp_path_factory.getbasetemp() / "dashboard-image"
    root = base / "bundles"
    if (root / IMAGE / "1" / "manifest.json").is_file():
        return root, (base / "codec").read_text()
    if (IMAGE_CODEC / "codec.json").is_file():
        assets, which = IMAGE_CODEC, "committed"
    else:
        from palettelink.train import data
        from palettelink.train.image_codec import train_image_codec

        assets, which = base / "tiny-codec", "tiny"
        train_image_codec(data.training_images(max_images=4), base / "tiny-work", assets, tiny=True)
    build_image_bundle(assets, out_root=root)
    (base / "codec").write_text(which)
    return root, which


class KnownResults:
    """Around a real task runner (whose preview stays the real picture): where it found nothing, a
    known result is added — a person mask over the frame's middle, a face of 468 points, a COCO-17
    pose — so that what the dashboard draws does not depend on the codec's quality."""

    def __init__(self, runner: Any, task: str) -> None:
        self.runner, self.task, self.name = runner, task, runner.name

    def run_batch(self, items: Sequence[Any], want_preview: bool = False) -> list[Any]:
        outs = self.runner.run_batch(items, want_preview)
        for d, out in zip(items, outs, strict=True):
            w, h = d.image_size
            if self.task == "segment" and not out.masks:
                out.masks.append(known_mask(w, h))
            elif self.task in ("landmarks", "pose") and not out.landmarks:
                box, points = known_landmarks(w, h, self.task)
                out.boxes.append(box)
                out.landmarks.append(points)
        return outs

    def warmup(self) -> None:
        self.runner.warmup()


def known_mask(w: int, h: int) -> Any:
    from server.results import Mask

    m = np.zeros((h, w), bool)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    return Mask(width=w, height=h, counts=tuple(rle.encode(m)), class_id=0, score=0.25)


def known_landmarks(w: int, h: int, task: str) -> tuple[Any, Any]:
    from server.results import Box, LandmarkSet

    n, scheme, name = (17, "coco17", "person") if task == "pose" else (468, "mediapipe468", "face")
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = tuple((float(w / 2 + w / 5 * np.cos(a)), float(h / 2 + h / 5 * np.sin(a)), 0.9) for a in t)
    box = Box(w * 0.3, h * 0.3, w * 0.7, h * 0.7, 0, name, 0.9)
    return box, LandmarkSet(points=pts, scheme=scheme, score=0.9)


def image_service(root: Path, **kw: Any) -> Any:
    """A loaded Service over ``root`` whose segment, landmarks and pose runners are wrapped in
    :class:`KnownResults`."""
    from server.service import Service

    svc = Service(root, max_batch=2, batch_wait_ms=5, shed_latency_ms=0, **kw)
    svc.load()
    for lb in svc.bundles.values():
        for task, batcher in lb.batchers.items():
            if task in ("segment", "landmarks", "pose"):
                batcher.runner = KnownResults(batcher.runner, task)
    return svc


def coded_image(bundle: Any, path: Path) -> bytes:
    """``path`` coded by the edge encoder of ``bundle`` (palette, finest level)."""
    from palettelink.codecs import make_encoder
    from palettelink.image import load_image

    enc = make_encoder(bundle, "palette")
    return enc.encode(load_image(path), enc.levels()[0]).payload


def stream(address: str, task: str, payloads: Sequence[bytes], client: str,
           want_preview: bool = True) -> list[Any]:
    """One gRPC stream of ``payloads`` for ``task``, to its end; the answers."""
    reqs = [pb.StreamRequest(header=pb.StreamHeader(bundle=IMAGE, task=task, client_id=client,
                                                    want_preview=want_preview))]
    reqs += [pb.StreamRequest(frame=pb.Frame(frame_id=i + 1, payload=p)) for i, p in enumerate(payloads)]
    with grpc.insecure_channel(address) as ch:
        answers = list(palettelink_pb2_grpc.PaletteLinkStub(ch).Stream(iter(reqs), timeout=180))
    assert answers and not [r for r in answers if r.result.HasField("error")], answers
    return answers


def jpeg_shape(data: bytes) -> tuple[int, ...]:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a JPEG that decodes"
    return tuple(img.shape)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from server.main import PaletteLinkServer

    root, _ = image_root(tmp_path_factory)
    srv = PaletteLinkServer(image_service(root, preview_frames=PREVIEW_FRAMES))
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def http(image_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_server.http_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def coded(image_server: Any, images: list[Path],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """bus.jpg (people) and scikit-image's astronaut (a face), coded for the image bundle."""
    from palettelink.samples import face_sample

    bundle = image_server.service.resolve(IMAGE).bundle
    out = {"bus": coded_image(bundle, images[0])}
    face = face_sample(tmp_path_factory.mktemp("face"))
    out["face"] = coded_image(bundle, face) if face else out["bus"]
    return out


def analyze(http: httpx.Client, payload: bytes, task: str, frame_id: int, **params: Any) -> dict[str, Any]:
    """POST /api/analyze, then that frame's entry of /api/frames (found by its frame id)."""
    r = http.post("/api/analyze", params={"bundle": IMAGE, "task": task, "frame_id": frame_id, **params},
                  content=payload)
    assert r.status_code == 200, r.text
    (frame,) = [f for f in http.get("/api/frames", params={"limit": 50}).json() if f["frame_id"] == frame_id]
    frame["answer"] = r.json()
    return frame


def assert_gone(r: httpx.Response) -> None:
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["status"] == "NOT_FOUND" and err["code"] and "no preview of frame" in err["message"]


# -- the preview store ----------------------------------------------------------------------------


def test_preview_stored_only_when_asked(http: httpx.Client, image_server: Any,
                                        coded: dict[str, bytes]) -> None:
    store = image_server.service.previews
    n = len(store)
    plain = analyze(http, coded["bus"], "detect", 101)
    assert plain["answer"]["output"]["preview_jpeg"] == 0 and len(store) == n
    assert plain["preview"] is False and "preview_url" not in plain and plain["key"] > 0
    assert_gone(http.get(f"/api/frames/{plain['key']}/preview.jpg"))

    asked = analyze(http, coded["bus"], "detect", 102, want_preview=True)
    assert asked["preview"] is True and asked["preview_url"] == f"/api/frames/{asked['key']}/preview.jpg"
    r = http.get(asked["preview_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert len(r.content) == asked["answer"]["output"]["preview_jpeg"]
    assert jpeg_shape(r.content) == (1080, 810, 3)  # the rebuilt picture at the frame's own size
    assert r.headers["cache-control"] == "no-store"


def test_preview_needs_the_token(image_server: Any, coded: dict[str, bytes]) -> None:
    """Cameras' pictures: with tokens on, the preview route is as closed as every other."""
    from server.auth import TokenAuth
    from server.main import PaletteLinkServer

    srv = PaletteLinkServer(image_server.service, auth=TokenAuth({"preview-s3cret": "viewer"}))
    srv.start()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=120,
                          headers={"authorization": "Bearer preview-s3cret"}) as http:
            f = analyze(http, coded["bus"], "preview", 121)
            assert http.get(f["preview_url"]).status_code == 200
            r = httpx.get(srv.http_url + f["preview_url"], timeout=30)
            assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    finally:
        srv.stop(grace=1.0, close_service=False)


def test_preview_task_is_asking_for_the_picture(http: httpx.Client, coded: dict[str, bytes]) -> None:
    """The preview task's one result is the picture: it is kept without want_preview."""
    f = analyze(http, coded["bus"], "preview", 111)
    assert f["preview"] is True and jpeg_shape(http.get(f["preview_url"]).content)[:2] == (1080, 810)


def test_unknown_and_bad_keys(http: httpx.Client) -> None:
    assert_gone(http.get("/api/frames/987654321/preview.jpg"))
    r = http.get("/api/frames/not-a-number/preview.jpg")
    assert r.status_code == 400 and "key" in r.json()["error"]["message"]


def test_previews_are_evicted_oldest_first(http: httpx.Client, coded: dict[str, bytes]) -> None:
    frames = [analyze(http, coded["bus"], "preview", 200 + i) for i in range(PREVIEW_FRAMES + 1)]
    codes = [http.get(f"/api/frames/{f['key']}/preview.jpg").status_code for f in frames]
    assert codes == [404] + [200] * PREVIEW_FRAMES
    now = {f["key"]: f["preview"] for f in http.get("/api/frames", params={"limit": 50}).json()}
    assert [now[f["key"]] for f in frames] == [False] + [True] * PREVIEW_FRAMES


def test_store_bounds_by_bytes_and_spares_each_streams_newest() -> None:
    from server.previews import PreviewStore

    s = PreviewStore(max_items=3, max_bytes=100)
    assert s.put(1, b"a" * 40) and s.put(2, b"b" * 40) and s.put(3, b"c" * 40)
    assert 1 not in s and [k in s for k in (2, 3)] == [True, True] and s.n_bytes == 80  # the byte cap
    assert not s.put(4, b"d" * 101) and 4 not in s  # larger than the cap: never kept
    s.put(5, b"e" * 10, owner="stream-a")  # stream a's newest …
    s.put(6, b"f" * 10)
    s.put(7, b"g" * 10)
    s.put(8, b"h" * 10)  # … outlives older pictures of nobody
    assert [k in s for k in (5, 6, 7, 8)] == [True, False, True, True] and len(s) == 3
    s.release("stream-a")  # closed: it ages like the others
    s.put(9, b"i" * 10)
    assert 5 not in s and len(s) == 3 and s.get(9) == b"i" * 10 and s.get(5) is None
    s = PreviewStore(max_items=2)
    for k in range(1, 4):
        s.put(k, b"x", owner=f"stream-{k}")  # more streams than room: the bound still holds
    assert len(s) == 2 and 1 not in s


# -- masks and landmark sets in the frame JSON ------------------------------------------------------


def closed_last(http: httpx.Client, client: str) -> dict[str, Any]:
    (s,) = [s for s in http.get("/api/streams").json()["closed"] if s["client"] == client]
    return s["last"]


def test_masks_reach_the_frame_json(http: httpx.Client, image_server: Any, coded: dict[str, bytes]) -> None:
    stream(image_server.grpc_address, "segment", [coded["bus"]], "dash-segment")
    last = closed_last(http, "dash-segment")
    assert last["task"] == "segment" and (last["width"], last["height"]) == (810, 1080)
    assert last["masks"], last
    for m in last["masks"]:
        mask = rle.decode(m["counts"], m["width"], m["height"])  # the wire's RLE, as the page decodes it
        assert mask.shape == (1080, 810) and 0 < mask.mean() < 1
    assert last["preview"] and jpeg_shape(http.get(last["preview_url"]).content)[:2] == (1080, 810)
    (f,) = [f for f in http.get("/api/frames").json() if f["client"] == "dash-segment"]
    assert f["key"] == last["key"] and f["masks"] == len(last["masks"]) and f["preview"]


@pytest.mark.parametrize(("task", "scheme", "n"), [("pose", "coco17", 17),
                                                   ("landmarks", "mediapipe468", 468)])
def test_landmarks_reach_the_frame_json(http: httpx.Client, image_server: Any, coded: dict[str, bytes],
                                        task: str, scheme: str, n: int) -> None:
    client = f"dash-{task}"
    stream(image_server.grpc_address, task, [coded["bus" if task == "pose" else "face"]], client,
           want_preview=False)
    last = closed_last(http, client)
    assert last["task"] == task and last["landmarks"] and last["preview"] is False
    for s in last["landmarks"]:
        assert s["scheme"] == scheme and len(s["points"]) == n and all(len(p) == 3 for p in s["points"])
        mx, my = 0.1 * last["width"], 0.1 * last["height"]  # in image pixels (a face may touch an edge)
        assert all(-mx <= x <= last["width"] + mx and -my <= y <= last["height"] + my
                   for x, y, _ in s["points"])
    assert len(last["boxes"]) >= len(last["landmarks"])  # a box per face or person
    (f,) = [f for f in http.get("/api/frames").json() if f["client"] == client]
    assert f["landmarks"] == len(last["landmarks"]) and not f["preview"]


def test_last_frame_json_stays_bounded(image_server: Any) -> None:
    """Masks with absurdly many runs, and more masks/landmark sets than the event carries, are cut."""
    from server.results import LandmarkSet, Mask, TaskOutput
    from server.sessions import MAX_LAST_LANDMARKS, MAX_LAST_MASKS, MAX_MASK_RUNS, output_json

    noisy = Mask(width=MAX_MASK_RUNS + 1, height=1, counts=(1,) * (MAX_MASK_RUNS + 1))
    small = Mask(width=2, height=1, counts=(1, 1))
    out = output_json(TaskOutput(masks=[noisy] + [small] * 10,
                                 landmarks=[LandmarkSet(((1.234, 2.345, 0.5),), "coco17")] * 40))
    assert len(out["masks"]) == MAX_LAST_MASKS - 1 and all(m["width"] == 2 for m in out["masks"])
    assert len(out["landmarks"]) == MAX_LAST_LANDMARKS and out["landmarks"][0]["points"] == [[1.2, 2.3, 0.5]]


# -- Try it with a task and a preview ---------------------------------------------------------------


def test_info_lists_the_tasks_the_try_page_offers(http: httpx.Client) -> None:
    (b,) = [b for b in http.get("/api/info").json()["bundles"] if b["name"] == IMAGE]
    assert b["tasks"] == ["detect", "segment", "landmarks", "pose", "preview"]
    page = http.get("/try").text
    assert 'id="try-task"' in page and 'id="try-preview"' in page


def test_try_with_a_task_and_a_preview(http: httpx.Client, images: list[Path]) -> None:
    data = images[0].read_bytes()
    r = http.post("/api/try", params={"bundle": IMAGE, "task": "segment", "want_preview": "true"},
                  content=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "segment" and (body["width"], body["height"]) == (810, 1080)
    for res in (body["result"], body["reference"]):
        assert res["masks"] and rle.decode(res["masks"][0]["counts"], 810, 1080).any()
        assert res["preview"] and res["key"] > 0
        pic = http.get(res["preview_url"])
        assert pic.status_code == 200 and jpeg_shape(pic.content)[:2] == (1080, 810)
    r = http.post("/api/try", params={"bundle": IMAGE, "task": "pose"}, content=data)
    res = r.json()["result"]
    assert res["landmarks"][0]["scheme"] == "coco17"
    assert res["preview"] is False and res["preview_url"] is None


def test_try_refuses_a_task_the_bundle_lacks(http: httpx.Client, images: list[Path]) -> None:
    r = http.post("/api/try", params={"bundle": IMAGE, "task": "depth"}, content=images[0].read_bytes())
    assert r.status_code == 400 and "segment" in r.json()["error"]["message"]


def test_openapi_documents_the_preview_route(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    op = spec["paths"]["/api/frames/{key}/preview.jpg"]["get"]
    assert "image/jpeg" in op["responses"]["200"]["content"] and "404" in op["responses"]
    schemas = spec["components"]["schemas"]
    assert {"masks", "landmarks", "preview_url"} <= set(schemas["LastFrameModel"]["properties"])
    assert {"key", "preview", "preview_url", "masks"} <= set(schemas["FrameSummaryModel"]["properties"])
    assert {"masks", "landmarks", "preview_url"} <= set(schemas["TryResultModel"]["properties"])
