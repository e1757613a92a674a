"""Every CLI error is one clear line and exit 2 (issue 20, item 6), run as real processes: unreadable
and truncated images, a level out of range named in the flag's words, inputs checked before any work,
a wrong port named at once, and a loadtest without --images. Each case checks the message and the
exit code. (A corrupt or partial --fetch-bundle: tests/test_bundle_fetch.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def script(name: str) -> list[str]:
    exe = BIN / name
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", {"palettelink-edge": "edge.client", "palettelink": "palettelink.cli"}[name]]


def run(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PALETTELINK_")}
    return subprocess.run(script(name) + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def one_error_line(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> dict[str, Path]:
    import cv2

    d = tmp_path_factory.mktemp("bad-images")
    jpeg = images[0].read_bytes()
    png = d / "full.png"
    assert cv2.imwrite(str(png), cv2.imread(str(images[0])))
    out = {"truncated_jpeg": d / "half.jpg", "truncated_png": d / "half.png", "not_an_image": d / "notes.jpg"}
    out["truncated_jpeg"].write_bytes(jpeg[: len(jpeg) // 2])
    out["truncated_png"].write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    out["not_an_image"].write_text("these are notes, not a picture\n")
    return out


def test_truncated_images_are_refused_before_decoding(bad_images: dict[str, Path],
                                                      images: list[Path]) -> None:
    from palettelink.errors import InvalidRequest
    from palettelink.image import load_image, truncation

    assert truncation(images[0]) is None and truncation(images[1]) is None
    for key in ("truncated_jpeg", "truncated_png"):
        assert truncation(bad_images[key]), key
        with pytest.raises(InvalidRequest, match="truncated"):
            load_image(bad_images[key])


@pytest.mark.parametrize("key, says", [("truncated_jpeg", "is truncated"), ("truncated_png", "is truncated"),
                                       ("not_an_image", "cannot read image")])
def test_edge_refuses_an_unreadable_image_with_exit_2(live_server, bundles_root: Path,  # noqa: ANN001
                                                      bad_images: dict[str, Path], key: str,
                                                      says: str) -> None:
    """It used to exit 1 (unreadable) or 0 with a libjpeg warning (truncated JPEG)."""
    path = str(bad_images[key])
    r = run("palettelink-edge", "--server", live_server.grpc_address, "--bundle", "fall-yolov8", "--bundles",
            str(bundles_root), "--codec", "baseline", "--bits", "4", path)
    line = one_error_line(r)
    assert line.startswith("palettelink-edge: error:") and path in line and says in line, line
    assert "Corrupt JPEG" not in r.stderr and "Premature end" not in r.stderr and "libpng" not in r.stderr
    (record,) = r.stdout.strip().splitlines()  # its one record
    assert record.startswith(f"{path}  INVALID_ARGUMENT: not read: "), record


def test_bits_out_of_range_says_bits(bundles_root: Path, images: list[Path]) -> None:
    r = run("palettelink-edge", "--server", "127.0.0.1:1", "--bundle", "fall-yolov8", "--bundles",
            str(bundles_root), "--codec", "baseline", "--bits", "12", str(images[0]))
    line = one_error_line(r)
    assert "--bits 12" in line and "bits per value" in line and "2 to 8" in line and "level" not in line, line


def test_a_wrong_port_is_named_at_once_with_the_fix(live_server, bundles_root: Path,  # noqa: ANN001
                                                   images: list[Path]) -> None:
    """The server's HTTP port given as --server: named in well under a second, not after the whole
    connect timeout, with the port to use instead."""
    http = live_server.http_url.removeprefix("http://")
    t0 = time.monotonic()
    r = run("palettelink-edge", "--server", http, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
            "--codec", "baseline", "--bits", "4", "--connect-timeout", "20", str(images[0]))
    wall = time.monotonic() - t0
    line = one_error_line(r, 3)
    assert http in line and "HTTP/1.1" in line and "--grpc-port" in line, line
    assert wall < 10, f"took {wall:.1f} s with --connect-timeout 20"


def test_preview_files_keep_the_source_name_once() -> None:
    from edge.records import preview_name

    taken: set[str] = set()
    assert preview_name("samples/bus.jpg", taken) == "samples_bus.jpg"
    assert preview_name("samples/bus.jpg", taken) == "samples_bus~2.jpg"  # a second frame of that name
    assert preview_name("clip.avi#12") == "clip#12.jpg"
    assert preview_name("/data/cam 1/x.png") == "data_cam_1_x.jpg"
    assert preview_name("./frames/0001.jpeg") == "frames_0001.jpg"
    assert not preview_name("a" * 300 + ".jpg").endswith(".jpg.jpg")


def test_usage_errors_are_one_line() -> None:
    for name, args, says in (("palettelink-edge", [], "--server"),
                             ("palettelink", ["bench-edge", "--size", "640"], "WIDTHxHEIGHT"),
                             ("palettelink", ["no-such-command"], "invalid choice")):
        line = one_error_line(run(name, *args))
        assert says in line and "--help" in line, line


def test_a_bench_with_a_missing_image_fails_before_any_work(tmp_path: Path) -> None:
    """It used to bench the samples first (minutes) and fail afterwards: the path is checked first,
    before the bundle is even looked up."""
    missing = tmp_path / "missing.jpg"
    t0 = time.monotonic()
    r = run("palettelink", "bench", "--bundles", str(tmp_path / "no-bundles"), "--images", str(missing),
            "--no-progress", "--out", str(tmp_path / "out"))
    line = one_error_line(r)
    assert f"{missing}: no such file" in line and "bundle" not in line, line
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 60
