"""``palettelink bench-edge``: what the edge box spends per frame, and what an int8 front costs.

Times, on this machine's CPU with ``--threads`` onnxruntime threads, median over ``--repeat`` runs on
real frames (vtest.avi at its native 768×576, letterboxed to the bundle's input):

- ``front.onnx``: the extractor alone (what any split codec pays);
- ``edge.onnx``: extractor + bottleneck encoder + nearest-entry search (the palette codec's graph);
- coding: cutting the embedded stream with the context model (``PaletteEncoder.encode_analysis``);
- the whole ``encode(frame, level)`` and the fps it allows.

Then the same front quantised to int8 (onnxruntime static QDQ quantisation, calibrated on training
frames, never on the evaluation frames it is scored on): its time, and the detector's AP50 on the
int8 front's tensors against the fp32 pipeline on held-out frames. Writes ``bench-edge.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.bundle import find_bundle
from palettelink.front import Front, ort_session
from palettelink.image import letterbox


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="fall-yolov8")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--level", type=int, default=0, help="palette level to encode (default 0, finest)")
    p.add_argument("--eval-frames", type=int, default=24, help="held-out frames for the int8 accuracy")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 front")
    p.add_argument("--out", type=Path, default=Path("bench-out"))


def _median_ms(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


class _Calibration:
    """onnxruntime's CalibrationDataReader over letterboxed training frames."""

    def __init__(self, inputs: list[np.ndarray], name: str) -> None:
        self.it = iter([{name: x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def quantise_front(src: Path, dst: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 QDQ quantisation of ``src`` (per-channel weights), calibrated on ``calibration``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = ort_session(str(pre)).get_inputs()[0].name
    quantize_static(str(pre), str(dst), _Calibration(calibration, name), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def run(args: argparse.Namespace) -> int:
    from palettelink.bench import metrics
    from palettelink.codecs import make_encoder
    from palettelink.models.ultra import SplitDetector
    from palettelink.train import data

    bundle = find_bundle(args.bundle, args.bundles)
    video = data.OPENCV_DATA / "vtest.avi"
    frames = data.load_all_rgb(data.video_frames(video, count=args.eval_frames, span=(0.7, 1.0)))
    rgb = frames[0]
    x, _ = letterbox(rgb, bundle.input_size)
    front = Front(bundle, args.threads)
    rows: dict[str, float] = {"front_ms": _median_ms(lambda: front.run_tensor(x), args.repeat)}
    report: dict[str, Any] = {"bundle": bundle.id, "threads": args.threads, "frame": list(rgb.shape[1::-1]),
                              "input": bundle.input_size}
    if "palette" in bundle.codecs:
        enc = make_encoder(bundle, "palette")
        edge = ort_session(str(bundle.file("edge.onnx")), args.threads)
        feeds = {edge.get_inputs()[0].name: x, "level": np.asarray(0, np.int64)}
        try:
            edge.run(None, feeds)
        except Exception:  # noqa: BLE001 - a graph whose level input has another shape
            feeds["level"] = np.asarray([0], np.int64)
        rows["edge_onnx_ms"] = _median_ms(lambda: edge.run(None, feeds), args.repeat)
        analysis = enc.analyse(rgb)
        rows["coding_ms"] = _median_ms(lambda: enc.encode_analysis(enc.analyse(rgb), args.level), 3) \
            - _median_ms(lambda: enc.analyse(rgb), 3)
        rows["encode_ms"] = _median_ms(lambda: enc.encode(rgb, args.level), args.repeat)
        rows["overhead_pct"] = 100.0 * (rows["encode_ms"] - rows["front_ms"]) / rows["front_ms"]
        rows["fps"] = 1e3 / rows["encode_ms"]
        rows["bytes"] = float(len(enc.encode_analysis(analysis, args.level).payload))
    if not args.no_int8:
        calib_items = data.video_frames(video, count=32, span=(0.0, 0.58))
        calib = [letterbox(f, bundle.input_size)[0] for f in data.load_all_rgb(calib_items)]
        with tempfile.TemporaryDirectory() as tmp:
            q = Path(tmp) / "front.int8.onnx"
            quantise_front(bundle.file("front.onnx"), q, calib)
            sess = ort_session(str(q), args.threads)
            name = sess.get_inputs()[0].name
            rows["front_int8_ms"] = _median_ms(lambda: sess.run(None, {name: x}), args.repeat)
            det = SplitDetector.from_bundle(bundle)
            refs, preds = [], []
            for f in frames:
                xf, lb = letterbox(f, bundle.input_size)
                refs.append(det.detect_tensors(front.run_tensor(xf), lb, conf=0.25))
                preds.append(det.detect_tensors(sess.run(None, {name: xf}), lb, conf=0.001))
            ap = metrics.evaluate(refs, preds)
            rows["front_int8_ap50"] = ap.ap50
            rows["front_int8_f1"] = metrics.agreement(refs, preds).f1
            report["int8_reference_boxes"] = ap.n_reference
    report["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-edge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{bundle.id}: one {rgb.shape[1]}×{rgb.shape[0]} vtest frame letterboxed to {bundle.input_size}², "
          f"onnxruntime CPU, {args.threads} thread(s), median of {args.repeat}")
    for k, v in rows.items():
        print(f"  {k:<16} {v:10.2f}")
    print(f"wrote {args.out / 'bench-edge.json'}")
    return 0
