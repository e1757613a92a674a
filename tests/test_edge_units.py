"""Edge pieces without a server: input expansion, frame iteration, the rate-control seam, and the
rule that nothing the edge imports pulls in torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.ratecontrol import FixedLevel, LevelCoder, StreamBudget, TargetBpp, TargetBytes, controller_from
from palettelink import capture
from palettelink.errors import InvalidRequest

EDGE_MODULES = ["edge.client", "palettelink.capture", "edge.transport", "edge.ratecontrol",
                "palettelink.codecs.baseline", "palettelink.front", "palettelink.ratecontrol",
                "palettelink.fetch"]


def test_edge_imports_no_torch_in_a_fresh_interpreter() -> None:
    code = (f"import importlib, sys\nfor m in {EDGE_MODULES!r}: importlib.import_module(m)\n"
            "heavy = ('torch', 'ultralytics', 'torchvision')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "print(bad[:5]); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"edge imports pulled in {r.stdout} {r.stderr[-2000:]}"


def _video(path: Path, n: int) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5.0, (64, 48))
    for i in range(n):
        w.write(np.full((48, 64, 3), 20 * i, np.uint8))
    w.release()
    return path


def test_expand_folders_and_report_every_bad_path(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(images[0].read_bytes())
    (tmp_path / ".hidden.jpg").write_bytes(images[0].read_bytes())
    (tmp_path / "readme.txt").write_text("not an image")
    _video(tmp_path / "b.avi", 2)
    srcs = capture.expand([str(tmp_path), "camera:0"])
    assert [(s.kind, Path(s.name).name) for s in srcs[:2]] == [("video", "b.avi"), ("image", "a.jpg")]
    assert srcs[2].kind == "camera" and srcs[2].camera == 0
    with pytest.raises(InvalidRequest) as e:
        capture.expand([str(tmp_path / "nope.png"), str(tmp_path / "readme.txt")])
    assert "nope.png: no such file" in str(e.value) and "readme.txt: not an image" in str(e.value)


def test_iter_frames_every_and_max(tmp_path: Path, images: list[Path]) -> None:
    video = _video(tmp_path / "v.avi", 7)
    srcs = capture.expand([str(video), str(images[0])])
    frames = list(capture.iter_frames(srcs, every=3))
    assert [f.label for f in frames] == [f"{video}#0", f"{video}#3", f"{video}#6", str(images[0])]
    assert frames[0].rgb.shape == (48, 64, 3) and frames[0].rgb.dtype == np.uint8
    assert frames[-1].rgb.shape[2] == 3 and frames[-1].kind == "image"
    assert [f.index for f in capture.iter_frames(srcs, max_frames=2)] == [0, 1]
    with pytest.raises(InvalidRequest):
        list(capture.iter_frames(srcs, every=0))


def test_unreadable_image_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InvalidRequest, match="broken.jpg"):
        list(capture.iter_frames(capture.expand([str(bad)])))


def test_controller_from_arguments() -> None:
    assert controller_from() is None
    assert isinstance(controller_from(level=3), FixedLevel)
    assert isinstance(controller_from(target_bpp=0.5), TargetBpp)
    assert isinstance(controller_from(target_bytes=1000), TargetBytes)
    assert isinstance(controller_from(kbps=500, fps=10), StreamBudget)
    with pytest.raises(InvalidRequest, match="together"):
        controller_from(kbps=500)
    with pytest.raises(InvalidRequest, match="one way"):
        controller_from(level=3, target_bpp=1.0)


def test_level_coder_uses_real_sizes(bundle, images: list[Path]) -> None:  # noqa: ANN001
    from palettelink.codecs import make_encoder
    from palettelink.image import load_image

    enc = make_encoder(bundle, "baseline")
    rgb = load_image(images[1])
    fixed = LevelCoder(enc, FixedLevel(5)).encode(rgb)
    assert fixed.encoded.level == 5 and fixed.choice is not None
    assert fixed.choice.n_bytes == len(fixed.encoded.payload)
    every = LevelCoder(enc, TargetBytes(1)).encode_all(rgb)
    assert sorted(every) == list(range(2, 9))
    assert every[5].payload == fixed.encoded.payload  # one front run per frame codes the same bytes
    budget = (len(every[4].payload) + len(every[5].payload)) // 2
    got = LevelCoder(enc, TargetBytes(budget)).encode(rgb)
    assert got.encoded.level == 4 and got.choice is not None and got.choice.warning is None
    tight = LevelCoder(enc, TargetBytes(10)).encode(rgb)
    assert tight.encoded.level == 2 and tight.choice is not None and tight.choice.warning
    with pytest.raises(InvalidRequest, match="levels are"):
        LevelCoder(enc, FixedLevel(12))
