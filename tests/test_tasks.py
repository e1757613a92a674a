"""Every task the server runs, through the real server and codec, on real pictures.

The image bundle (vision-image: the image codec + the model zoo) serves detect, segment, landmarks,
pose and preview from one stream; the CenterNet split bundle (family onnx) serves detect from its
tail.onnx. Frames are coded at the image codec's finest level (or 8-bit baseline for the split), so
what is checked is that the task survives the codec, not the model's own accuracy.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from palettelink import rle
from palettelink.codecs import make_encoder
from palettelink.errors import BundleError
from palettelink.image import load_image
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc

IMAGE = "vision-image"
SPLIT = "centernet-split"


@pytest.fixture(scope="module")
def task_server(image_bundles_root: Path):  # noqa: ANN201
    from server.main import PaletteLinkServer
    from server.service import Service

    svc = Service(image_bundles_root, max_batch=2, batch_wait_ms=5, shed_latency_ms=0)
    srv = PaletteLinkServer(svc)
    srv.start()
    srv.load()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def stub(task_server):  # noqa: ANN001, ANN201
    with grpc.insecure_channel(task_server.grpc_address) as channel:
        yield palettelink_pb2_grpc.PaletteLinkStub(channel)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("faces") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def _coded(bundle, path: Path, codec: str = "palette", level: int = 0) -> bytes:  # noqa: ANN001
    return make_encoder(bundle, codec).encode(load_image(path), level).payload


def analyze(stub, bundle, path: Path, task: str, **kw) -> pb.FrameResult:  # noqa: ANN001, ANN003
    req = pb.AnalyzeRequest(bundle=bundle.id, task=task, payload=_coded(bundle, path, **kw))
    return stub.Analyze(req, timeout=120).result


def _inside(x: float, y: float, box: pb.Box, margin: float = 0.1) -> bool:
    mx, my = margin * (box.x2 - box.x1), margin * (box.y2 - box.y1)
    return box.x1 - mx <= x <= box.x2 + mx and box.y1 - my <= y <= box.y2 + my


def test_get_info_lists_each_bundles_tasks(stub) -> None:  # noqa: ANN001
    info = {b.name: list(b.tasks) for b in stub.GetInfo(pb.GetInfoRequest(), timeout=30).bundles}
    assert info[IMAGE] == ["detect", "segment", "landmarks", "pose", "preview"]
    assert info[SPLIT] == ["detect"]


def test_bus_gives_persons_through_the_image_codec(stub, image_bundle, images) -> None:  # noqa: ANN001
    r = analyze(stub, image_bundle, images[0], "detect")
    names = [b.class_name for b in r.boxes]
    assert names.count("person") >= 2, names


@pytest.mark.xfail(strict=True, reason="the CPU-trained image codec (45 min) blurs the bus below CenterNet's "
                   "0.3 threshold at its finest level (uncompressed: bus 0.62); the split bundle finds it")
def test_bus_gives_a_bus_through_the_image_codec(stub, image_bundle, images) -> None:  # noqa: ANN001
    names = [b.class_name for b in analyze(stub, image_bundle, images[0], "detect").boxes]
    assert "bus" in names, names


def test_a_mask_covers_the_person_in_zidane(stub, image_bundle, images) -> None:  # noqa: ANN001
    people = [b for b in analyze(stub, image_bundle, images[1], "detect").boxes if b.class_name == "person"]
    (m,) = analyze(stub, image_bundle, images[1], "segment").masks
    mask = rle.decode(list(m.counts), m.width, m.height)
    assert (m.width, m.height) == (1280, 720)
    big = max(people, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1))
    inside = mask[int(big.y1):int(big.y2), int(big.x1):int(big.x2)].mean()
    assert inside > 0.4, inside
    outside = mask.sum() - mask[int(big.y1):int(big.y2), int(big.x1):int(big.x2)].sum()
    assert outside / mask.size < 0.25


def test_landmarks_fall_inside_the_face_box_on_the_astronaut(stub, image_bundle, astronaut) -> None:  # noqa: ANN001
    r = analyze(stub, image_bundle, astronaut, "landmarks")
    assert len(r.boxes) == 1 and len(r.landmarks) == 1
    pts = r.landmarks[0].points
    assert len(pts) == 468 and r.landmarks[0].scheme == "mediapipe468"
    inside = np.mean([_inside(p.x, p.y, r.boxes[0], margin=0.15) for p in pts])
    assert inside >= 0.95, inside


def test_pose_keypoints_fall_inside_each_person_box(stub, image_bundle, images) -> None:  # noqa: ANN001
    r = analyze(stub, image_bundle, images[1], "pose")
    assert r.landmarks and len(r.landmarks) == len(r.boxes)
    for box, kps in zip(r.boxes, r.landmarks, strict=True):
        assert kps.scheme == "coco17" and len(kps.points) == 17
        sure = [p for p in kps.points if p.visibility >= 0.3]
        assert sure and all(_inside(p.x, p.y, box) for p in sure)


@pytest.mark.parametrize("scene", ["grey", "coffee"])
def test_a_picture_with_nobody_gives_empty_results_not_an_error(stub, image_bundle, tmp_path,
                                                                 scene) -> None:  # noqa: ANN001
    from PIL import Image
    from skimage import data

    path = tmp_path / f"{scene}.png"
    rgb = np.full((240, 320, 3), 128, np.uint8) if scene == "grey" else data.coffee()
    Image.fromarray(rgb).save(path)  # the selfie model alone marks the cup: the mask is gated on people
    for task in ("segment", "landmarks", "pose"):
        r = analyze(stub, image_bundle, path, task)
        assert not r.HasField("error") and not r.masks and not r.landmarks, task


def test_the_preview_is_the_rebuilt_picture(stub, image_bundle, images) -> None:  # noqa: ANN001
    from PIL import Image

    req = pb.AnalyzeRequest(bundle=image_bundle.id, task="detect", want_preview=True,
                            payload=_coded(image_bundle, images[0]))
    r = stub.Analyze(req, timeout=120).result
    with Image.open(io.BytesIO(r.preview_jpeg)) as im:
        assert im.size == (810, 1080)
    assert r.boxes  # one stream serves the detector and the person watching at once


def test_an_unknown_task_names_the_tasks_the_bundle_has(stub, image_bundle, images) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        analyze(stub, image_bundle, images[0], "depth")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "segment" in e.value.details() and "pose" in e.value.details()


@pytest.mark.parametrize("task", ["detect", "segment", "landmarks", "pose", "preview"])
def test_each_task_streams_through_the_edge_client(task_server, image_bundles_root, images, astronaut,
                                                    task, tmp_path, capsys) -> None:  # noqa: ANN001
    from edge import client

    out = io.StringIO()
    args = client.build_parser().parse_args(
        ["--server", task_server.grpc_address, "--bundles", str(image_bundles_root), "--bundle", IMAGE,
         "--task", task, "--level", "0", "--json", "--preview", str(tmp_path),
         str(images[1]), str(astronaut)])
    assert client.run(args, out) == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(recs) == 2 and all(r["error"] is None for r in recs)
    got = {"detect": sum(len(r["boxes"]) for r in recs), "segment": sum(len(r["masks"]) for r in recs),
           "landmarks": sum(len(r["landmarks"]) for r in recs),
           "pose": sum(len(r["landmarks"]) for r in recs),
           "preview": sum(r["preview_bytes"] > 0 for r in recs)}[task]
    assert got >= 1, recs
    assert len(list(tmp_path.glob("*.jpg"))) == 2


def test_the_centernet_split_is_exact_and_detects_through_its_tail(stub, image_bundles_root, images) -> None:  # noqa: ANN001
    import onnx

    from palettelink.bundle import find_bundle
    from palettelink.models import zoo
    from palettelink.models.onnx_split import verify_split, with_image_input
    from palettelink.train.build_bundle import _sample_inputs

    b = find_bundle(SPLIT, image_bundles_root)
    assert b.manifest["family"] == "onnx" and len(b.tensors) >= 2  # the head reads several strides
    assert b.manifest["tail"]["verified_max_rel_diff"] <= 1e-5
    spec = zoo.input_spec("centernet")
    whole = image_bundles_root / "whole.onnx"
    onnx.save(with_image_input(zoo.verified_file("centernet"), 512, "nhwc", spec["scale"]), str(whole))
    assert verify_split(whole, b.file("front.onnx"), b.file("tail.onnx"), _sample_inputs(512)) <= 1e-5
    r = stub.Analyze(pb.AnalyzeRequest(bundle=b.id, task="detect",
                                       payload=_coded(b, images[0], "baseline", 8)), timeout=60).result
    names = [x.class_name for x in r.boxes]
    assert "bus" in names and "person" in names, names


def test_a_cut_that_does_not_exist_lists_candidate_tensors(tmp_path) -> None:  # noqa: ANN001
    from palettelink.train.build_bundle import build_onnx_bundle

    with pytest.raises(BundleError, match="not produced by any node.*candidates: "):
        build_onnx_bundle("centernet", ["no/such:0"], tmp_path)
    assert not list(tmp_path.rglob("manifest.json"))  # nothing half-written


def test_the_server_refuses_to_start_on_a_damaged_model_file(image_bundles_root, tmp_path) -> None:  # noqa: ANN001
    root = tmp_path / "bundles"
    shutil.copytree(image_bundles_root / IMAGE, root / IMAGE)
    victim = next((root / IMAGE / "1" / "models").glob("selfie*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-100])
    p = subprocess.run([sys.executable, "-m", "server.main", "--bundles", str(root), "--bundle", IMAGE,
                        "--grpc-port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert f"models/{victim.name}" in p.stderr and "Traceback" not in p.stderr


def test_bench_tasks_scores_every_task_per_level_beside_jpeg(image_bundles_root, tmp_path) -> None:  # noqa: ANN001
    from palettelink import cli

    out = tmp_path / "bench"
    assert cli.main(["bench-tasks", "--bundles", str(image_bundles_root), "--codecs", "palette",
                     "--levels", "0,7", "--anchors", "jpeg", "--qualities", "50", "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "bench-tasks.json").read_text())
    rows = {(r["method"], r["label"]): r for r in report["rows"]}
    assert set(rows) == {("palette", "L0"), ("palette", "L7"), ("jpeg", "q50")}
    assert rows[("palette", "L7")]["bpp"] < rows[("palette", "L0")]["bpp"]
    for r in rows.values():
        assert 10 < r["psnr"] < 60 and 0 < r["msssim"] <= 1
        assert 0 <= r["detect"]["ap50"] <= 1 and 0 <= r["segment"]["iou"] <= 1
        assert r["pose"]["n_reference"] >= 1 and r["landmarks"]["n_reference"] >= 1  # the astronaut
    assert (out / "tasks.png").stat().st_size > 10_000


def test_bench_tasks_scores_detection_against_coco_labels(image_bundles_root, images, tmp_path) -> None:  # noqa: ANN001
    from palettelink import cli

    # labels for bus.jpg: the bus and the two people in front (x, y, w, h), COCO's own category ids
    coco = {"images": [{"id": 7, "file_name": "bus.jpg"}],
            "categories": [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 6, "bbox": [17, 230, 790, 520]},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [48, 398, 197, 504]},
                            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [222, 406, 123, 450]}]}
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(coco))
    out = tmp_path / "bench"
    assert cli.main(["bench-tasks", "--bundles", str(image_bundles_root), "--tasks", "detect", "--codecs",
                     "palette", "--levels", "0", "--anchors", "jpeg", "--qualities", "50", "--images",
                     str(images[0]), "--coco", str(labels), "--out", str(out), "--no-progress"]) == 0
    lab = json.loads((out / "bench-tasks.json").read_text())["labels"]
    assert lab["images"] == 1 and lab["boxes"] == 3
    assert lab["uncompressed"]["ap50"] > 0.5  # the real model on the real labels
    assert set(lab["rows"]) == {"palette L0", "jpeg q50"}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["bench-tasks", "--bundles", str(image_bundles_root), "--tasks", "detect",
                     "--images", str(images[0]), "--coco", str(bad), "--out", str(out), "--no-progress"]) == 2
