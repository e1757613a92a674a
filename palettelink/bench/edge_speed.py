"""``palettelink bench-edge``: what the edge box spends per frame, measured on the edge box itself.

Runs on the edge-only install (numpy, onnxruntime, OpenCV, constriction, gRPC; never torch or
ultralytics: tested with ``python -X importtime``). Frames are the sample images that ship with the
package (or ``--images``), resized to ``--size WxH`` like a camera's frames. Each is coded exactly as
``palettelink-edge`` codes it (``encode(frame, level)``: letterbox, the ONNX front, the codec) with
``--threads`` onnxruntime intra-op threads: ``--warmup`` frames first (untimed: the first runs pay
for allocation and caches), then ``--repeat`` timed ones, cycling over the frames. Per stage (prep =
letterbox and the rest, the ONNX graph, coding), in all, and in CPU time (all threads of the process)
it reports the median, the 10th–90th percentile range and the spread ((p90 − p10) / median), and the
fps the median allows; it names the CPU, the usable CPUs, the threads and the load average before and
after, since other work on the box is what moves these figures most: on a busy box the wall-clock
figures move with the load, the CPU time per frame hardly. Writes ``bench-edge.json`` (every timed
sample kept).

Idle onnxruntime threads do not spin (``--spin`` turns busy-waiting back on): spinning threads fight
every other process for the cores, which made runs on a shared box disagree by 3×.

``--int8`` (needs the ``train`` extra: torch, onnx) adds a static int8 front (onnxruntime QDQ
quantisation, calibrated on training frames of vtest.avi) and the detector's AP50 on its tensors
against the fp32 pipeline on held-out frames.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.errors import InvalidRequest


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise argparse.ArgumentTypeError(f"--size {text}: each side must be 16..8192 pixels")
    return w, h


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name, name/version or folder")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR",
                   help="bundle root (default: $PALETTELINK_BUNDLES or ./bundles; then the fetch cache)")
    p.add_argument("--codec", default=None, help="codec (default: the bundle's default, as the edge client)")
    p.add_argument("--level", type=int, default=None,
                   help="level to encode (default: the codec's default, as the edge client)")
    p.add_argument("--size", type=_size, default=(640, 480), metavar="WxH",
                   help="frame size the inputs are resized to (default 640x480)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: the CPUs this process may use)")
    p.add_argument("--spin", action="store_true", help="let idle onnxruntime threads busy-wait")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames first (default 3)")
    p.add_argument("--repeat", type=int, default=20, help="timed frames (default 20)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="images, folders or videos (first 8 frames; default: the sample images)")
    p.add_argument("--int8", action="store_true",
                   help="also an int8 front: time and AP50 (needs the train extra)")
    p.add_argument("--eval-frames", type=int, default=24, help="held-out frames for the int8 accuracy")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench-edge.json")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86 ``model name``; ARM ``Model``/``Hardware``/``CPU part``),
    else what the platform says."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip(), value.strip())
        for key in ("model name", "Model", "Hardware", "cpu model"):
            if key in fields:
                return fields[key]
        if "CPU part" in fields:
            return f"{platform.machine()} (CPU implementer {fields.get('CPU implementer', '?')}, part " \
                   f"{fields['CPU part']})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def stats(samples: list[float]) -> dict[str, float]:
    """Median, 10th/90th percentiles and the spread (p90 − p10) / median in %."""
    a = np.asarray(samples, np.float64)
    med, p10, p90 = (float(np.percentile(a, q)) for q in (50, 10, 90))
    return {"median_ms": round(med, 2), "p10_ms": round(p10, 2), "p90_ms": round(p90, 2),
            "spread_pct": round(100.0 * (p90 - p10) / med, 1) if med > 0 else 0.0}


def frames_at(paths: list[str], size: tuple[int, int], limit: int = 8) -> list[tuple[str, np.ndarray]]:
    """The inputs as ``size`` frames (resized like a camera of that size would deliver them)."""
    import cv2

    from palettelink import capture

    sources = capture.expand(paths)  # bad paths named before anything is measured
    out = []
    for cap in capture.iter_frames(sources, max_frames=limit):
        rgb = cap.rgb
        if (rgb.shape[1], rgb.shape[0]) != size:
            shrink = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append((Path(cap.source).name + ("" if cap.kind == "image" else f"#{cap.index}"), rgb))
    if not out:
        raise InvalidRequest(f"no frames in {' '.join(paths)}")
    return out


def _bundle(args: argparse.Namespace) -> Any:
    from palettelink.bundle import find_bundle
    from palettelink.errors import BundleNotFound
    from palettelink.fetch import default_cache

    try:
        return find_bundle(args.bundle, args.bundles, side="edge")
    except BundleNotFound as first:
        try:
            return find_bundle(args.bundle, default_cache(), side="edge")
        except BundleNotFound:
            raise BundleNotFound(f"{first} (nor in the fetch cache {default_cache()}; fetch it with "
                                 "palettelink-edge --fetch-bundle NAME --server HOST:PORT)") from None


def measure(encoder: Any, frames: list[tuple[str, np.ndarray]], level: int | None, warmup: int,
            repeat: int) -> dict[str, Any]:
    """``warmup`` untimed encodes, then ``repeat`` timed ones cycling over ``frames``: per-stage
    samples (ms) and stats, and the payload sizes."""
    for i in range(warmup):
        encoder.encode(frames[i % len(frames)][1], level)
    samples: dict[str, list[float]] = {"prep": [], "onnx": [], "coding": [], "total": [], "cpu": []}
    sizes = []
    for i in range(repeat):
        rgb = frames[(warmup + i) % len(frames)][1]
        c0, t0 = time.process_time(), time.perf_counter()
        enc = encoder.encode(rgb, level)
        total = (time.perf_counter() - t0) * 1e3
        samples["cpu"].append((time.process_time() - c0) * 1e3)
        onnx, coding = enc.timings_ms.get("front_ms", 0.0), enc.timings_ms.get("encode_ms", 0.0)
        samples["total"].append(total)
        samples["onnx"].append(onnx)
        samples["coding"].append(coding)
        samples["prep"].append(max(0.0, total - onnx - coding))
        sizes.append(len(enc.payload))
    return {"stages": {k: {**stats(v), "samples_ms": [round(x, 3) for x in v]} for k, v in samples.items()},
            "bytes_median": int(np.median(sizes)), "level": enc.level}


STAGE_NAMES = {"prep": "prep (letterbox, copies)", "onnx": "ONNX graph (front{})", "coding": "coding",
               "total": "total per frame", "cpu": "CPU time (all threads)"}


def run(args: argparse.Namespace) -> int:
    from palettelink import __version__
    from palettelink.cliutil import check_extra

    if args.warmup < 0 or args.repeat < 3 or (args.threads is not None and args.threads < 1):
        raise InvalidRequest("--repeat must be ≥ 3, --warmup ≥ 0, --threads ≥ 1")
    if args.int8 and (code := check_extra("palettelink bench-edge --int8", "train")) is not None:
        return code
    frames = frames_at(args.images or ["samples:"], args.size)  # inputs first: nothing measured yet
    bundle = _bundle(args)

    import onnxruntime as ort

    from palettelink.codecs import default_codec, make_encoder
    from palettelink.front import set_session_defaults

    threads = args.threads or usable_cpus()
    set_session_defaults(threads, spinning=args.spin)
    codec = args.codec or default_codec(bundle)
    encoder = make_encoder(bundle, codec)
    if args.level is not None and args.level not in encoder.levels():
        raise InvalidRequest(f"--level {args.level} is not offered by the {codec} codec; its levels are "
                             f"{sorted(encoder.levels())}")
    cpu, cpus = cpu_model(), usable_cpus()
    load_before = _load()
    t0 = time.perf_counter()
    result = measure(encoder, frames, args.level, args.warmup, args.repeat)
    wall = time.perf_counter() - t0
    load_after = _load()
    total = result["stages"]["total"]
    report: dict[str, Any] = {
        "palettelink": __version__, "bundle": bundle.id, "codec": codec, "level": result["level"],
        "size": list(args.size), "input": bundle.input_size, "frames": [name for name, _ in frames],
        "cpu": cpu, "usable_cpus": cpus, "online_cpus": os.cpu_count(), "threads": threads,
        "spinning": bool(args.spin), "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "machine": platform.machine(),
        "load_average_before": load_before, "load_average_after": load_after,
        "warmup": args.warmup, "repeat": args.repeat, "wall_s": round(wall, 2),
        "stages": result["stages"], "bytes_median": result["bytes_median"],
        "fps": round(1e3 / total["median_ms"], 2) if total["median_ms"] > 0 else None,
    }
    w, h = args.size
    print(f"bench-edge {bundle.id}: {codec} level {result['level']}, {len(frames)} frame(s) at {w}x{h} "
          f"({', '.join(report['frames'][:4])}{', …' if len(frames) > 4 else ''}) letterboxed to "
          f"{bundle.input_size}²")
    print(f"  CPU {cpu}: {cpus} usable of {os.cpu_count()} online; onnxruntime {ort.__version__} CPU, "
          f"{threads} intra-op thread(s), spinning {'on' if args.spin else 'off'}; load average "
          f"{load_before} before, {load_after} after")
    print(f"  {args.warmup} warm-up frame(s), then {args.repeat} timed ({wall:.1f} s):")
    print(f"    {'stage':<30}{'median ms':>10}{'p10–p90 ms':>18}{'spread':>9}")
    for key, st in result["stages"].items():
        name = STAGE_NAMES[key].format("" if codec == "baseline" else " + encoder")
        rng = f"{st['p10_ms']:.1f}–{st['p90_ms']:.1f}"
        print(f"    {name:<30}{st['median_ms']:>10.1f}{rng:>18}{st['spread_pct']:>8.1f}%")
    cpu_ms = result["stages"]["cpu"]["median_ms"]
    report["cpu_fps_per_core"] = round(1e3 / cpu_ms, 2) if cpu_ms > 0 else None
    print(f"  {report['fps']} fps at the median; {report['bytes_median']:,} B per frame; the work is "
          f"{cpu_ms:.0f} CPU-ms per frame ({report['cpu_fps_per_core']} fps per free core: the figure that "
          "other work on the box moves least)")
    if cpus and load_before is not None and max(load_before, load_after or 0) > 0.5 * cpus:
        print(f"  note: the load average is over half the {cpus} CPU(s): other work competes for them, and "
              "these figures move with it")
    if args.int8:
        report["int8"] = _int8(bundle, threads, args.eval_frames, args.repeat)
        for k, v in report["int8"].items():
            print(f"  int8 {k:<18} {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-edge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench-edge.json'}")
    return 0


# -- the int8 front (train extra) -------------------------------------------------------------


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

    from palettelink.front import ort_session

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = ort_session(str(pre)).get_inputs()[0].name
    quantize_static(str(pre), str(dst), _Calibration(calibration, name), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _int8(bundle: Any, threads: int, eval_frames: int, repeat: int) -> dict[str, float]:
    """fp32 and int8 front times on a vtest frame, and the int8 front's AP50/F1 against fp32."""
    from palettelink.bench import metrics
    from palettelink.front import Front, ort_session
    from palettelink.image import letterbox
    from palettelink.models.ultra import SplitDetector
    from palettelink.train import data

    def median_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return round(float(np.median(times)), 2)

    full = _full_bundle(bundle)
    video = data.OPENCV_DATA / "vtest.avi"
    frames = data.load_all_rgb(data.video_frames(video, count=eval_frames, span=(0.7, 1.0)))
    x, _ = letterbox(frames[0], full.input_size)
    front = Front(full, threads)
    calib = [letterbox(f, full.input_size)[0]
             for f in data.load_all_rgb(data.video_frames(video, count=32, span=(0.0, 0.58)))]
    out: dict[str, float] = {"front_fp32_ms": median_ms(lambda: front.run_tensor(x))}
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "front.int8.onnx"
        quantise_front(full.file("front.onnx"), q, calib)
        sess = ort_session(str(q), threads)
        name = sess.get_inputs()[0].name
        out["front_int8_ms"] = median_ms(lambda: sess.run(None, {name: x}))
        det = SplitDetector.from_bundle(full)
        refs, preds = [], []
        for f in frames:
            xf, lb = letterbox(f, full.input_size)
            refs.append(det.detect_tensors(front.run_tensor(xf), lb, conf=0.25))
            preds.append(det.detect_tensors(sess.run(None, {name: xf}), lb, conf=0.001))
        out["front_int8_ap50"] = round(metrics.evaluate(refs, preds).ap50, 4)
        out["front_int8_f1"] = round(metrics.agreement(refs, preds).f1, 4)
    return out


def _full_bundle(bundle: Any) -> Any:
    """The whole bundle (the int8 accuracy needs the server's tail too)."""
    from palettelink.bundle import Bundle

    return bundle if bundle.side != "edge" else Bundle.load(bundle.path)
