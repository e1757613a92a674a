"""`palettelink train --adapt`: a deployment's own footage in, the next version of the bundle out —
loadable, verified, recording what it was adapted on; bad input refused before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from palettelink.bundle import find_bundle
from palettelink.codecs import Decoder, make_encoder
from palettelink.image import load_image

TINY = ["--tiny", "--minutes", "0.1", "--finetune-minutes", "0.05", "--k0", "32", "--levels", "5",
        "--every", "1", "--max-images", "6"]


def train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "palettelink.cli", "train", *args], capture_output=True,
                          text=True, timeout=600)


def write_clip(path: Path, images: list[Path], frames: int = 6) -> Path:
    """A short MJPG clip of the sample images panning sideways: a tiny 'site camera'."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for k in range(frames):
        bgr = cv2.cvtColor(load_image(images[k % len(images)]), cv2.COLOR_RGB2BGR)
        bgr = cv2.resize(bgr, (640 + 8 * frames, 480))
        out.write(np.ascontiguousarray(bgr[:, 8 * k:8 * k + 640]))
    out.release()
    return path


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory, bundles_root: Path, images: list[Path]) -> Path:
    tmp = tmp_path_factory.mktemp("adapt")
    clip = write_clip(tmp / "site.avi", images)
    run = train("--adapt", "fall-yolov8", "--bundles", str(bundles_root), "--bundle-out", str(tmp / "out"),
                "--images", str(clip), "--work", str(tmp / "work"), *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fall-yolov8/2" in run.stdout
    return tmp / "out"


def test_adaptation_writes_a_loadable_next_version(adapted: Path, images: list[Path]) -> None:
    bundle = find_bundle("fall-yolov8/2", adapted)  # verifies every sha256
    info = bundle.manifest["adapted"]
    assert info["from"] == "fall-yolov8/1" and info["images"][0].endswith("site.avi")
    assert sum(info["items"].values()) == 6
    enc, dec = make_encoder(bundle, "palette"), Decoder(bundle)
    decoded = dec.decode(enc.encode(load_image(images[0]), 1).payload)
    assert decoded.codec == "palette" and decoded.level == 1
    assert [t.shape[1:] for t in decoded.tensors] == [t.shape for t in bundle.tensors]


def test_adapted_version_has_its_own_tables(adapted: Path, bundles_root: Path) -> None:
    """Streams name the table hash, so a server never decodes a site's frames with generic tables."""
    parent, child = find_bundle("fall-yolov8/1", bundles_root), find_bundle("fall-yolov8/2", adapted)
    assert child.table_hash != parent.table_hash
    assert child.manifest["adapted"]["from_table_hash"] == parent.manifest["table_hash"]


def test_adapting_a_bundle_without_a_codec_is_a_clear_error(tmp_path: Path, images: list[Path]) -> None:
    from palettelink.train.build_bundle import build_bundle

    build_bundle(out_root=tmp_path / "root", codec_assets=tmp_path / "no-assets")
    clip = write_clip(tmp_path / "site.avi", images, frames=2)
    run = train("--adapt", "fall-yolov8", "--bundles", str(tmp_path / "root"), "--images", str(clip),
                "--work", str(tmp_path / "work"), *TINY)
    assert run.returncode == 2 and "has no trained palette codec" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "root" / "fall-yolov8" / "2").exists()


@pytest.mark.parametrize("kind", ["empty folder", "broken video", "missing path"])
def test_bad_footage_is_refused_naming_the_path(kind: str, tmp_path: Path, bundles_root: Path) -> None:
    target = {"empty folder": tmp_path / "empty", "broken video": tmp_path / "broken.avi",
              "missing path": tmp_path / "nowhere"}[kind]
    if kind == "empty folder":
        target.mkdir()
        (target / "notes.txt").write_text("no pictures here")
    elif kind == "broken video":
        target.write_bytes(b"not a video at all" * 100)
    out = tmp_path / "out"
    run = train("--adapt", "fall-yolov8", "--bundles", str(bundles_root), "--bundle-out", str(out),
                "--images", str(target), "--work", str(tmp_path / "work"), *TINY)
    assert run.returncode == 2, run.stderr[-2000:]
    assert str(target) in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
