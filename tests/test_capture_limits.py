"""Big images at the edge (issue 10): dimensions are read from the file header and checked before
any decoding; an oversized input is a typed error naming the file, and the other inputs go on —
in ``palettelink.capture`` and in the real ``palettelink-edge`` against the real server."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from palettelink import capture
from palettelink.errors import ImageTooLarge, InvalidRequest
from palettelink.image import MAX_IMAGE_PIXELS, image_size, load_image

REPO = Path(__file__).resolve().parents[1]


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit greyscale PNG of ``width``×``height`` written row by row (never whole in memory):
    20,000² pixels compress to a few hundred KB, and decode to 1.2 GB of BGR."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "none", then the packed bits
    idat = bytearray()
    for _ in range(height):
        idat += z.compress(row)
    idat += z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(idat))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, images: list[Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    wide = d / "wide.png"
    assert cv2.imwrite(str(wide), np.zeros((16, 16385, 3), np.uint8))  # a side no frame can carry
    return {"huge": bilevel_png(d / "huge.png", 20_000, 20_000), "wide": wide,
            "many": bilevel_png(d / "many.png", 9000, 9000),  # both sides fit; too many pixels
            "good": images[0]}


def test_the_header_says_the_size_without_decoding(inputs: dict[str, Path]) -> None:
    assert inputs["huge"].stat().st_size < 1_000_000
    assert image_size(inputs["many"]) == (9000, 9000) and 9000 * 9000 > MAX_IMAGE_PIXELS
    assert image_size(inputs["wide"]) == (16385, 16)
    assert image_size(inputs["huge"]) == (20_000, 20_000)  # past Pillow's own bomb limit, still named
    for name in ("huge", "wide", "many"):
        with pytest.raises(ImageTooLarge, match=inputs[name].name):
            load_image(inputs[name])
    assert load_image(inputs["good"]).shape == (1080, 810, 3)


def test_capture_skips_big_images_and_goes_on_with_low_memory(inputs: dict[str, Path]) -> None:
    """In a fresh interpreter, so its peak RSS is this capture's: decoding the 20,000² PNG whole would
    take ≥ 1.2 GB; checked from the header, the run stays near the interpreter's own size."""
    order = [str(inputs[k]) for k in ("huge", "wide", "good", "many")]
    code = (
        "import json, re, sys\n"
        "from palettelink import capture\n"
        "errors = []\n"
        "frames = [(f.source, f.rgb.shape) for f in capture.iter_frames(capture.expand(sys.argv[1:]),\n"
        "          on_error=lambda src, e: errors.append((src.name, type(e).__name__, str(e))))]\n"
        # VmHWM: this process image's peak (ru_maxrss would carry the forking pytest's peak over exec)
        "rss = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print(json.dumps({'frames': frames, 'errors': errors, 'rss_mb': rss}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["frames"] == [[str(inputs["good"]), [1080, 810, 3]]]
    assert [(name, kind) for name, kind, _ in out["errors"]] == \
        [(order[0], "ImageTooLarge"), (order[1], "ImageTooLarge"), (order[3], "ImageTooLarge")]
    huge, wide, many = (msg for _, _, msg in out["errors"])
    assert "huge.png" in huge and "20000x20000" in huge
    assert "wide.png" in wide and "16385x16" in wide and "16384" in wide
    assert "many.png" in many and "9000x9000" in many
    assert out["rss_mb"] < 600, f"peak RSS {out['rss_mb']} MB: the big image was decoded"


def test_without_on_error_the_first_bad_input_raises(inputs: dict[str, Path]) -> None:
    with pytest.raises(ImageTooLarge, match="wide.png"):
        list(capture.iter_frames(capture.expand([str(inputs["wide"]), str(inputs["good"])])))


def test_a_corrupt_image_is_skipped_too(tmp_path: Path, inputs: dict[str, Path]) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    seen: list[tuple[str, Exception]] = []
    got = list(capture.iter_frames(capture.expand([str(bad), str(inputs["good"])]),
                                   on_error=lambda src, e: seen.append((src.name, e))))
    assert [f.source for f in got] == [str(inputs["good"])]
    (name, err), = seen
    assert name == str(bad) and isinstance(err, InvalidRequest) and "broken.jpg" in str(err)


def test_edge_client_reports_big_images_and_streams_the_others(live_server, bundles_root: Path,  # noqa: ANN001
                                                                inputs: dict[str, Path]) -> None:
    args = ["--server", live_server.grpc_address, "--bundle", "fall-yolov8", "--bundles", str(bundles_root),
            "--codec", "baseline", "--bits", "4", "--json",
            str(inputs["huge"]), str(inputs["good"]), str(inputs["wide"])]
    r = subprocess.run([sys.executable, "-m", "edge.client", *args], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, r.stderr[-3000:]  # bad inputs (exit 2), named; the rest was answered
    recs = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda rec: rec["frame_id"])
    # one record per input all the same (in the order they were read: frame ids)
    assert [rec["source"] for rec in recs] == [str(inputs[k]) for k in ("huge", "good", "wide")]
    assert [rec["outcome"] for rec in recs] == ["not_read", "ok", "not_read"]
    assert recs[1]["error"] is None and recs[1]["boxes"]
    for rec, size in ((recs[0], "20000x20000"), (recs[2], "16385x16")):
        assert rec["error"]["status"] == "INVALID_ARGUMENT" and size in rec["error"]["message"]
    for name, size in (("huge", "20000x20000"), ("wide", "16385x16")):
        assert str(inputs[name]) in r.stderr and size in r.stderr
    assert "2 input(s) could not be read" in r.stderr
