"""The server's onnxruntime path for YOLO bundles (issue 17, server speed): ``tail.onnx`` exported by
``build-bundle``, the palette decoder on the frame's window, int8 graphs kept only where they agree.

Real bundle, real detector, real onnxruntime, no mocks. Agreement is AP50 of the onnxruntime path's
boxes against the torch path's (library decoder on the whole latent, torch tail) on the sample images,
as they are and as 640×480 camera frames; old bundles (no tail.onnx) keep the torch path. Speed is
``bench-serve``'s business, not a test's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from palettelink import bitstream
from palettelink.bundle import MANIFEST, find_bundle, write_manifest
from palettelink.codecs import Decoder, make_encoder
from palettelink.codecs.palette import PaletteDecoder
from palettelink.front import INT8_MIN_RETAINED
from palettelink.image import Letterbox, Window, content_window, letterbox_info, load_image, window_letterbox
from palettelink.models.ultra_ort import (
    RUNTIME_ENV,
    SERVER_INT8_MIN_AGREEMENT,
    choose_server_graph,
    tail_file,
    uses_onnxruntime,
)
from palettelink.models.windowed_palette import WindowedPaletteDecoder
from palettelink.train.int8_serve import agreement, output_convs, passes, torch_reference


def _frames(images: list[Path]) -> list[np.ndarray]:
    """bus.jpg and zidane.jpg as they are and as 640×480 camera frames."""
    rgbs = [load_image(p) for p in images]
    return rgbs + [cv2.resize(x, (640, 480), interpolation=cv2.INTER_AREA) for x in rgbs]


@pytest.fixture(scope="module")
def payloads(bundle, images: list[Path]) -> dict[str, list[bytes]]:  # noqa: ANN001
    rgbs = _frames(images)
    pal, base = make_encoder(bundle, "palette"), make_encoder(bundle, "baseline")
    return {"palette": [pal.encode(x).payload for x in rgbs],
            "baseline": [base.encode(x, 4).payload for x in rgbs]}


def _service(root: Path, monkeypatch: pytest.MonkeyPatch, runtime: str = "auto",  # noqa: ANN202
             max_batch: int | None = 1):
    from server.service import Service

    monkeypatch.setenv(RUNTIME_ENV, runtime)
    svc = Service(root, ["fall-yolov8"], max_batch=max_batch, batch_wait_ms=0, shed_latency_ms=0)
    svc.load()
    return svc


def _boxes(svc, payload: bytes) -> list:  # noqa: ANN001
    from palettelink.models.ultra import Detection

    out = svc.analyze("fall-yolov8", "detect", payload).output.boxes
    return [Detection((b.x1, b.y1, b.x2, b.y2), b.class_id, b.score) for b in out]


# -- window ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "want"), [
    ((640, 480), (0, 64, 640, 576)),      # 80 px of grey above and below: cut at the 32-px cells
    ((1280, 720), (0, 128, 640, 512)),
    ((810, 1080), (64, 0, 576, 640)),     # portrait: columns
    ((640, 640), (0, 0, 640, 640)),
    ((1, 10000), (320, 0, 352, 640)),     # a sliver still gets one cell
    ((10000, 1), (0, 320, 640, 352)),
])
def test_content_window(size: tuple[int, int], want: tuple[int, int, int, int]) -> None:
    w = content_window(size, 640, 32)
    assert w.box() == want
    lb = letterbox_info(*size, 640)
    nw, nh = round(size[0] * lb.scale), round(size[1] * lb.scale)
    assert w.x0 <= lb.pad_x and lb.pad_x + nw <= w.x1 and w.y0 <= lb.pad_y and lb.pad_y + nh <= w.y1
    assert all(v % 32 == 0 for v in want)


def test_window_letterbox_maps_window_boxes_like_whole_ones() -> None:
    lb = letterbox_info(640, 480, 640)
    win = Window(0, 64, 640, 576)
    box_whole = np.array([[100.0, 200.0, 300.0, 400.0]])
    box_win = box_whole - [0, 64, 0, 64]
    got = window_letterbox(lb, win.box()).boxes_to_image(box_win)
    np.testing.assert_allclose(got, lb.boxes_to_image(box_whole))
    assert window_letterbox(lb, None) == lb and isinstance(window_letterbox(lb, win.box()), Letterbox)


# -- the bundle and the server's choice ------------------------------------------------------------


def test_build_bundle_exports_tail_onnx_for_the_server(bundle) -> None:  # noqa: ANN001
    serve = bundle.manifest["serve"]
    assert tail_file(bundle) == "tail.onnx" == serve["tail"]["file"]
    assert serve["tail"]["inputs"] == [t.name for t in bundle.tensors]
    assert serve["tail"]["verified_max_rel_diff"] <= 1e-4  # against the torch tail, whole and windowed
    assert serve["window"]["align"] == 32
    assert "tail.onnx" in bundle.manifest["files"] and "tail.onnx" in bundle.sides["server"]
    assert "tail.onnx" not in bundle.sides["edge"]
    assert uses_onnxruntime(bundle, "cpu")
    assert choose_server_graph(bundle, "tail.onnx").precision == "fp32"  # no int8 kept in this build


def test_windowed_decoder_decodes_the_same_symbols(bundle, payloads) -> None:  # noqa: ANN001
    """Bit-exact symbols: the windowed decoder's index maps are the library decoder's, its latent the
    same values cut to the window."""
    lib, win = PaletteDecoder(bundle), WindowedPaletteDecoder(bundle)
    for p in payloads["palette"]:
        frame = bitstream.unpack(p)
        a, b = lib.decode_indices(frame), win.decode_indices(frame)
        assert np.array_equal(a.indices, b.indices) and a.level == b.level
        z, level, sent, box = win.latent(frame)
        full = lib.tables.dequantise(a.indices, a.level)
        w = content_window(frame.image_size, bundle.input_size, 32)
        assert box == w.box() or (box is None and w.box() == (0, 0, 640, 640))
        rows, cols = w.cells(16)
        assert np.array_equal(z, full[:, :, rows, cols]) and (level, sent) == (a.level, a.sent_level)
        d = win.decode_frame(frame, len(p))
        assert d.window == box and d.tensors[0].shape[-2:] == ((w.y1 - w.y0) // 8, (w.x1 - w.x0) // 8)


def test_onnxruntime_path_agrees_with_the_torch_path(bundles_root: Path, payloads,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's answers on its onnxruntime path (window, tail.onnx) against the torch path's, both
    through the real Service: AP50 ≥ 0.99 on every codec, and the same number of boxes."""
    ort_svc = _service(bundles_root, monkeypatch, "auto")
    torch_svc = _service(bundles_root, monkeypatch, "torch")
    try:
        lb_o, lb_t = ort_svc.bundles["fall-yolov8/1"], torch_svc.bundles["fall-yolov8/1"]
        assert lb_o.batchers["detect"].runner.runtime == "onnxruntime"
        assert lb_t.batchers["detect"].runner.runtime == "torch"
        assert isinstance(lb_o.decoder._get("palette"), WindowedPaletteDecoder)
        assert not isinstance(lb_t.decoder._get("palette"), WindowedPaletteDecoder)
        for codec, ps in payloads.items():
            ref = [_boxes(torch_svc, p) for p in ps]
            got = [_boxes(ort_svc, p) for p in ps]
            assert sum(len(r) for r in ref) >= 8, codec
            a = agreement(ref, got)
            assert a is not None and a >= SERVER_INT8_MIN_AGREEMENT, (codec, a)
            assert [len(g) for g in got] == [len(r) for r in ref], codec
    finally:
        ort_svc.close()
        torch_svc.close()


def test_onnxruntime_batch_mixes_windows_and_whole_frames(bundle, payloads) -> None:  # noqa: ANN001
    """Dynamic batching on the onnxruntime path: frames of different windows (and baseline's whole
    letterbox) in one batch get what each gets alone."""
    from server.tasks.detect import DetectRunner

    runner = DetectRunner(bundle)
    dec = Decoder(bundle, {"palette": WindowedPaletteDecoder(bundle)})
    items = [dec.decode(p) for p in payloads["palette"] + payloads["baseline"][:2]]
    assert len({tuple(d.tensors[0].shape) for d in items}) >= 3
    alone = [runner.run_batch([d])[0].boxes for d in items]
    together = runner.run_batch(items)
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b.boxes)
        for x, y in zip(a, b.boxes, strict=True):
            assert x.class_id == y.class_id and abs(x.score - y.score) < 1e-3
            assert np.allclose([x.x1, x.y1, x.x2, x.y2], [y.x1, y.y1, y.x2, y.y2], atol=0.5)


@pytest.mark.parametrize(("runtime", "want"), [("auto", 1), ("torch", 8)])
def test_batching_is_off_by_default_where_it_does_not_pay(bundles_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                         runtime: str, want: int) -> None:
    """max_batch None (palettelink-server's default): onnxruntime on the CPU runs frames one by one (a
    batch costs there what its frames cost alone, so a lone frame would only wait for company); the
    torch tail keeps batching 8."""
    svc = _service(bundles_root, monkeypatch, runtime, max_batch=None)
    try:
        assert svc.bundles["fall-yolov8/1"].batchers["detect"].max_batch == want
    finally:
        svc.close()


# -- old bundles -----------------------------------------------------------------------------------


def _old_copy(bundles_root: Path, tmp_path: Path, keep_entry: bool = False) -> Path:
    """A copy of the bundle as build-bundle wrote it before tail.onnx (or, ``keep_entry``, with the
    manifest naming a tail.onnx the folder does not hold)."""
    root = tmp_path / "bundles"
    src = bundles_root / "fall-yolov8" / "1"
    dst = root / "fall-yolov8" / "1"
    shutil.copytree(src, dst)
    (dst / "tail.onnx").unlink()
    m = json.loads((dst / MANIFEST).read_text())
    if not keep_entry:
        m.pop("serve")
    write_manifest(dst, m)
    return root


@pytest.mark.parametrize("keep_entry", [False, True], ids=["no serve entry", "tail.onnx missing"])
def test_old_bundle_falls_back_to_torch(bundles_root: Path, tmp_path: Path, payloads,  # noqa: ANN001
                                        monkeypatch: pytest.MonkeyPatch, keep_entry: bool) -> None:
    root = _old_copy(bundles_root, tmp_path, keep_entry)
    old = find_bundle("fall-yolov8", root)
    assert tail_file(old) is None and not uses_onnxruntime(old)
    svc = _service(root, monkeypatch, "auto")
    try:
        lb = svc.bundles["fall-yolov8/1"]
        assert lb.batchers["detect"].runner.runtime == "torch"
        assert not isinstance(lb.decoder._get("palette"), WindowedPaletteDecoder)
        for codec, ps in payloads.items():
            ref = torch_reference(old, ps, conf=0.25)
            got = [_boxes(svc, p) for p in ps]
            for r, g in zip(ref, got, strict=True):  # exactly the library's torch answer
                assert [d.class_id for d in r] == [d.class_id for d in g], codec
                np.testing.assert_allclose([d.xyxy for d in r], [d.xyxy for d in g], atol=0.05)
    finally:
        svc.close()


def test_server_int8_graphs_are_measured_and_kept_by_the_rule(bundles_root: Path, tmp_path: Path,
                                                              payloads) -> None:  # noqa: ANN001
    """build-bundle's server int8 step, the default 24 calibration images, 6 leave-source-out frames:
    every configuration measured against the torch path, int8 files kept only with ``default`` and an
    agreement reaching the rule, the server's choice follows the record, and whatever it runs agrees
    with the torch path on the sample images."""
    from palettelink.train.int8_serve import build

    root = tmp_path / "bundles"
    dst = root / "fall-yolov8" / "1"
    shutil.copytree(bundles_root / "fall-yolov8" / "1", dst)
    made = build(dst, calibration=24, frames=6, log=lambda _: None, every=True)
    if made is None:
        pytest.skip("no training images or leave-source-out frames on this machine")
    m = json.loads((dst / MANIFEST).read_text())
    m["serve"].update(made)
    write_manifest(dst, m)
    b = find_bundle("fall-yolov8", root)
    meas = b.manifest["serve"]["measurement"]
    assert {"fp32 whole", "fp32 window", "int8 decoder", "int8 tail", "int8 decoder + tail"} <= set(
        meas["configurations"])
    for row in meas["configurations"].values():
        assert row["palette"]["tail_ms"] > 0
    for row in meas["configurations"].values():  # each path also against the uncompressed pipeline
        assert 0 <= row["palette"]["ap50"] <= 1 and row["retained"] == min(
            row[c]["retained"] for c in ("palette", "baseline") if c in row)
    kept = b.manifest["serve"]["int8"]
    for graph, entry in kept.items():
        assert entry["default"] is True and entry["agreement"] >= SERVER_INT8_MIN_AGREEMENT
        assert entry["retained"] >= INT8_MIN_RETAINED
        assert passes(meas["configurations"][entry["configuration"]])
        assert b.has_file(entry["file"]) and entry["file"] in b.sides["server"]
        assert choose_server_graph(b, graph).precision == "int8"
    for graph in {"decoder.onnx", "tail.onnx"} - set(kept):
        assert choose_server_graph(b, graph).precision == "fp32"
        assert not (dst / graph.replace(".onnx", ".int8.onnx")).exists()
    assert b.table_hash == find_bundle("fall-yolov8", bundles_root).table_hash  # streams unchanged
    # whatever the server now runs (int8 where kept) agrees with the torch path on the samples
    from palettelink.models.ultra import Detection
    from server.tasks.detect import DetectRunner

    runner = DetectRunner(b)
    dec = Decoder(b, {"palette": WindowedPaletteDecoder(b)})
    for codec, ps in payloads.items():
        ref = torch_reference(b, ps, conf=0.25)
        got = [[Detection((o.x1, o.y1, o.x2, o.y2), o.class_id, o.score)
                for o in runner.run_batch([dec.decode(p)])[0].boxes] for p in ps]
        a = agreement(ref, got)
        scores = [([round(d.score, 3) for d in r], [(o.class_id, round(o.score, 3)) for o in g])
                  for r, g in zip(ref, got, strict=True)]
        assert a is not None and a >= SERVER_INT8_MIN_AGREEMENT, (codec, a, meas["chosen"], scores)


def test_bench_serve_names_the_path_it_measured(bundles_root: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """bench-serve on 640×480 frames: each row says which runtime answered (onnxruntime tail and
    windowed decoder, or ``--runtime torch``), and the environment is left as it was."""
    import os

    from palettelink.cli import main

    rows = {}
    for runtime in ("auto", "torch"):
        out = tmp_path / f"{runtime}.json"
        rc = main(["bench-serve", "--bundles", str(bundles_root), "--codec", "palette", "--size", "640x480",
                   "--no-batching", "--seconds", "1", "--warmup", "0.5", "--repeat", "1", "--device", "cpu",
                   "--runtime", runtime, "--out", str(out)])
        assert rc == 0, capsys.readouterr().out
        rep = json.loads(out.read_text())
        assert rep["runtime"] == runtime and rep["size"] == [640, 480]
        (row,) = rep["results"]
        assert row["frames_per_s"] > 0 and row["n_errors"] == 0
        rows[runtime] = row["serve_path"]
    assert rows["auto"]["runtime"] == "onnxruntime" and rows["auto"]["tail"].startswith("tail")
    assert rows["auto"]["window"] is True
    assert rows["torch"] == {"runtime": "torch", "tail": "torch", "decoder": "decoder.onnx (fp32)",
                             "window": False}
    assert RUNTIME_ENV not in os.environ


def test_the_decoders_output_convolutions_stay_fp32(bundle) -> None:  # noqa: ANN001
    """The convolutions the int8 decoder keeps fp32 are exactly those whose outputs become the crossing
    tensors through elementwise operations only: one per output, the last of its head."""
    import onnx

    path = bundle.file("decoder.onnx")
    found = output_convs(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    assert len(found) == len(graph.output) == len(bundle.tensors)
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert set(found) <= set(convs) and len(found) < len(convs)
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    for n in graph.node:  # no activation follows any of them
        if n.name in found:
            assert "Sigmoid" not in consumers.get(n.output[0], [])


def test_the_server_int8_rule_reads_both_references() -> None:
    """A path that agrees with the torch path but loses what the codec kept against the uncompressed
    pipeline is refused, as is one that agrees too little; missing figures never pass."""
    ok = {"agreement": 0.999, "retained": 0.995}
    assert passes(ok)
    assert not passes({**ok, "retained": 0.98})
    assert not passes({**ok, "agreement": 0.98})
    assert not passes({**ok, "retained": None}) and not passes({"agreement": 1.0})
