"""The palette codec codes the frame's window of the letterbox (issue 17, rectangular input): the edge
runs its graph on the rows that hold the picture, the stream carries that latent, and every server path
decodes it: the onnxruntime path as it is, any other placed among the grey's palette entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from edge.transport import server_decodes_windows
from palettelink import bitstream
from palettelink.bundle import MANIFEST, find_bundle, write_manifest
from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder
from palettelink.codecs.palette import window as palette_window
from palettelink.errors import InvalidStream
from palettelink.image import Window, letterbox, letterbox_info, load_image, window_letterbox
from palettelink.models.windowed_palette import WindowedPaletteDecoder
from palettelink.scoring import evaluate


def _camera_frames(images: list[Path]) -> list[np.ndarray]:
    """bus.jpg and zidane.jpg as 640×480 camera frames (a quarter of the square is grey)."""
    return [cv2.resize(load_image(p), (640, 480), interpolation=cv2.INTER_AREA) for p in images]


# -- geometry --------------------------------------------------------------------------------------


def test_window_of_a_4_by_3_frame_is_its_rows_on_whole_cells(bundle) -> None:  # noqa: ANN001
    assert palette_window.alignment(bundle) == 32 and palette_window.latent_stride(bundle) == 16
    assert palette_window.frame_window(bundle, (640, 480)) == Window(0, 64, 640, 576)
    assert palette_window.window_latent_hw(bundle, (640, 480)) == (32, 40)
    assert palette_window.window_latent_hw(bundle, (1080, 1920)) == (40, 24)  # portrait: columns
    assert palette_window.frame_window(bundle, (500, 500)) is None  # a square picture: no window
    assert palette_window.window_latent_hw(bundle, (500, 500)) is None


def test_letterbox_of_a_window_is_that_part_of_the_square(images) -> None:  # noqa: ANN001
    """The edge converts only its window's pixels: the same float values as cutting the whole square."""
    for rgb in _camera_frames(images):
        square, info = letterbox(rgb, 640)
        win = Window(0, 64, 640, 576)
        part, info_part = letterbox(rgb, 640, window=win)
        assert info_part == info and part.flags["C_CONTIGUOUS"] and part.dtype == np.float32
        assert np.array_equal(part, square[:, :, 64:576, :])
        assert np.array_equal(square[0, :, 0, 0], np.full(3, np.float32(114) / np.float32(255)))


def test_place_puts_the_window_among_the_fill() -> None:
    ids = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    out = palette_window.place(ids, Window(16, 32, 64, 64), (4, 5), 16, [7, 9])
    assert out.shape == (2, 4, 5)
    assert np.array_equal(out[:, 2:4, 1:4], ids)
    assert (out[0, :2] == 7).all() and (out[1, :, 4] == 9).all()


def test_square_novelty_weights_the_left_out_cells_at_the_grey() -> None:
    assert palette_window.square_novelty(1.0, 1280, 1600, 0.5) == pytest.approx((1280 + 160) / 1600)
    assert palette_window.square_novelty(0.8, 1600, 1600, 0.1) == pytest.approx(0.8)


# -- the bundle ------------------------------------------------------------------------------------


def test_bundle_records_the_grey_latent_and_a_dynamic_edge_graph(bundle) -> None:  # noqa: ANN001
    entry = bundle.codecs["palette"]
    enc = PaletteEncoder(bundle)
    assert len(entry["pad_indices"]) == enc.tables.n_groups
    assert all(0 <= v < enc.tables.sizes[0] for v in entry["pad_indices"])
    assert entry["pad_novelty"] > 0
    # fitted on training pictures where this machine has them (the grey square's own otherwise)
    assert entry["pad_novelty_fit"].startswith(("least squares over", "the grey square's own"))
    assert enc.window_capable and not enc.window  # capable; whole squares unless asked
    dims = enc.session.get_inputs()[0].shape[-2:]
    assert not all(isinstance(d, int) for d in dims)
    # the grey square is coded as its grey entries everywhere but near nothing: its centre is the pad
    grey = np.full((480, 640, 3), 114, np.uint8)
    idx = enc.analyse(grey).indices
    assert np.array_equal(idx[:, 20, 20], entry["pad_indices"])


# -- edge → stream → server ------------------------------------------------------------------------


def test_edge_codes_the_window_with_fewer_bytes_and_a_latent_of_its_shape(bundle, images) -> None:  # noqa: ANN001
    square, win = PaletteEncoder(bundle), PaletteEncoder(bundle, window=True)
    assert win.window
    for rgb in _camera_frames(images):
        a_sq, a_w = square.analyse(rgb), win.analyse(rgb)
        assert a_sq.indices.shape[1:] == (40, 40) and a_w.indices.shape[1:] == (32, 40)
        assert a_w.window == Window(0, 64, 640, 576) and a_sq.window is None
        # the picture's cells away from the window's border are mostly the same finest entries (the
        # front's receptive field spans the frame, so the grey beyond the window moves some: 85 % agree
        # on these frames; the detections are what must agree, below)
        inner = a_sq.indices[:, 4 + 2:4 + 30, 2:38] == a_w.indices[:, 2:30, 2:38]
        assert inner.mean() > 0.75
        # the novelty is put on the square's scale: close to the square's own
        assert a_w.novelty == pytest.approx(a_sq.novelty, rel=0.1)
        for level in win.levels():
            e_sq, e_w = square.encode_analysis(a_sq, level), win.encode_analysis(a_w, level)
            assert bitstream.unpack(e_w.payload).shapes == ((32, 32, 40),)
            assert len(e_w.payload) < len(e_sq.payload)


def test_every_server_path_decodes_a_window_like_the_square(bundle, images, detector) -> None:  # noqa: ANN001
    """The base decoder places the window into a square (every task reads it), the onnxruntime path
    decodes it as it is; both find the boxes the square stream gives (AP50 ≥ 0.9 against them)."""
    square, win = PaletteEncoder(bundle), PaletteEncoder(bundle, window=True)
    lib, ort = PaletteDecoder(bundle), WindowedPaletteDecoder(bundle)
    refs, placed, windowed = [], [], []
    for rgb in _camera_frames(images):
        p_sq, p_w = square.encode(rgb).payload, win.encode(rgb).payload
        f_sq, f_w = bitstream.unpack(p_sq), bitstream.unpack(p_w)
        lb = letterbox_info(640, 480, bundle.input_size)
        refs.append(detector.detect_tensors(lib.decode_frame(f_sq, len(p_sq)).tensors, lb, conf=0.25))
        d_lib = lib.decode_frame(f_w, len(p_w))
        assert d_lib.window is None
        assert [t.shape[-2:] for t in d_lib.tensors] == [(80, 80), (40, 40), (20, 20)]
        placed.append(detector.detect_tensors(d_lib.tensors, lb, conf=0.001))
        d_ort = ort.decode_frame(f_w, len(p_w))
        assert d_ort.window == (0, 64, 640, 576)
        assert [t.shape[-2:] for t in d_ort.tensors] == [(64, 80), (32, 40), (16, 20)]
        lb_win = window_letterbox(lb, d_ort.window)
        windowed.append(detector.detect_tensors(d_ort.tensors, lb_win, conf=0.001))
        # the symbols are the edge's, bit-exact, whichever decoder reads them
        r = lib.decode_indices(f_w)
        assert np.array_equal(r.indices, win.tables.ids_at(win.analyse(rgb).indices, r.level))
    assert sum(len(r) for r in refs) >= 4
    assert evaluate(refs, placed).ap50 >= 0.9
    assert evaluate(refs, windowed).ap50 >= 0.9


def test_a_latent_of_the_wrong_window_is_refused(bundle, images) -> None:  # noqa: ANN001
    """A 32×40 latent for a square picture, or for a picture whose window is another, is refused by
    name: the window is computed from the image size, never trusted from the stream."""
    win = PaletteEncoder(bundle, window=True)
    frame = bitstream.unpack(win.encode(_camera_frames(images)[0]).payload)
    for size in ((640, 640), (480, 640)):
        bad = bitstream.Frame(frame.codec_id, frame.param, frame.bundle_id, frame.table_hash, size,
                              frame.shapes, frame.layers, frame.progressive, frame.codec_flags)
        for dec in (PaletteDecoder(bundle), WindowedPaletteDecoder(bundle)):
            with pytest.raises(InvalidStream, match="latent 32x40 is not the bundle's 40x40"):
                dec.decode_frame(bad, 1)


def _without_windows(bundles_root: Path, tmp_path: Path) -> Path:
    """A copy of the bundle as build-bundle wrote it before windows (no grey latent recorded)."""
    root = tmp_path / "bundles"
    dst = root / "fall-yolov8" / "1"
    shutil.copytree(bundles_root / "fall-yolov8" / "1", dst)
    m = json.loads((dst / MANIFEST).read_text())
    for key in ("pad_indices", "pad_novelty"):
        m["codecs"]["palette"].pop(key)
    write_manifest(dst, m)
    return root


def test_a_bundle_built_before_windows_codes_squares_and_refuses_windows(bundle, bundles_root: Path,  # noqa: ANN001
                                                                         tmp_path: Path, images) -> None:
    old = find_bundle("fall-yolov8", _without_windows(bundles_root, tmp_path))
    enc = PaletteEncoder(old, window=True)
    assert not enc.window_capable and not enc.window
    rgb = _camera_frames(images)[0]
    assert bitstream.unpack(enc.encode(rgb).payload).shapes == ((32, 40, 40),)
    payload = PaletteEncoder(bundle, window=True).encode(rgb).payload
    with pytest.raises(InvalidStream, match="latent 32x40 is not the bundle's 40x40$"):
        PaletteDecoder(old).decode_frame(bitstream.unpack(payload), len(payload))


def test_getinfo_tells_the_edge_the_server_decodes_windows(live_server, bundle) -> None:  # noqa: ANN001
    from palettelink.v1 import palettelink_pb2 as pb
    from palettelink.v1 import palettelink_pb2_grpc as pb_grpc

    with grpc.insecure_channel(live_server.grpc_address) as channel:
        info = pb_grpc.PaletteLinkStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        codecs = {c.name: c for b in info.bundles if b.name == "fall-yolov8" for c in b.codecs}
        assert codecs["palette"].window_latent and not codecs["baseline"].window_latent
        assert server_decodes_windows(channel, bundle.id, []) is True
        assert server_decodes_windows(channel, "no-such-bundle/1", []) is False
    with grpc.insecure_channel("127.0.0.1:1") as nowhere:  # no answer: None, and no exception
        assert server_decodes_windows(nowhere, bundle.id, [], timeout=0.5) is None


def test_the_image_bundle_codes_windows_on_its_latent_cells(image_bundle, images) -> None:  # noqa: ANN001
    """The image bundle's one crossing tensor is the picture (stride 1): its windows are cut on the
    latent's 8-px cells, and the rebuilt picture inside the window is the square stream's."""
    from palettelink.codecs import Decoder, make_encoder

    assert palette_window.alignment(image_bundle) == palette_window.latent_stride(image_bundle) == 8
    enc, dec = make_encoder(image_bundle, "palette"), Decoder(image_bundle)
    assert enc.window_capable
    rgb = _camera_frames(images)[0]
    square = dec.decode(enc.encode(rgb).payload).tensors[0]
    enc.window = True
    payload = enc.encode(rgb).payload
    assert bitstream.unpack(payload).shapes == ((32, 48, 64),)
    rebuilt = dec.decode(payload).tensors[0]
    assert rebuilt.shape == square.shape == (1, 3, 512, 512)
    win = palette_window.frame_window(image_bundle, (640, 480))
    assert win == Window(0, 64, 512, 448)
    inside = (slice(None), slice(None), slice(win.y0, win.y1), slice(win.x0, win.x1))
    assert float(np.abs(rebuilt[inside] - square[inside]).mean()) < 0.02


def _edge_records(server: str, bundles: Path, images: list[Path], *extra: str) -> tuple[list[dict], str]:
    import subprocess

    from helpers import env, script

    cmd = [*script("palettelink-edge"), "--server", server, "--bundle", "fall-yolov8", "--bundles",
           str(bundles), "--codec", "palette", "--json", *extra, *map(str, images)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")], r.stderr


def test_the_edge_codes_windows_for_a_server_that_decodes_them(bundles_root: Path, images,  # noqa: ANN001
                                                               server_process) -> None:  # noqa: ANN001
    from helpers import env, script

    cmd = [*script("palettelink-server"), "--bundles", str(bundles_root), "--grpc-port", "0",
           "--http-port", "0"]
    with server_process(cmd, env(), Path.cwd(), stop_timeout=30) as ready:
        auto, note = _edge_records(ready["grpc"], bundles_root, images)
        square, _ = _edge_records(ready["grpc"], bundles_root, images, "--canvas", "square")
    assert "does not say it decodes" not in note
    assert [r["outcome"] for r in auto + square] == ["ok"] * 4
    for a, s in zip(auto, square, strict=True):  # the pictures are not square: their windows are smaller
        assert a["level"] == s["level"] and a["bytes"] < s["bytes"]
        assert len(a["boxes"]) >= 1 and len(s["boxes"]) >= 1


def test_the_edge_codes_squares_for_a_server_that_does_not(bundle, bundles_root: Path, tmp_path: Path,  # noqa: ANN001
                                                           images, server_process) -> None:  # noqa: ANN001
    from helpers import env, script

    old = _without_windows(bundles_root, tmp_path)
    cmd = [*script("palettelink-server"), "--bundles", str(old), "--grpc-port", "0", "--http-port", "0"]
    with server_process(cmd, env(), Path.cwd(), stop_timeout=30) as ready:
        recs, note = _edge_records(ready["grpc"], bundles_root, images)
    assert "does not say it decodes the frame's window" in note and "Traceback" not in note
    assert [r["outcome"] for r in recs] == ["ok", "ok"] and all(r["boxes"] for r in recs)
