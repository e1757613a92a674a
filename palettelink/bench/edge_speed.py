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
every other process for the cores, which made runs on a shared box disagree by 3×. Sessions are set
up as the edge sets them (``palettelink.front.session_settings``: intra-op threads from the usable
CPUs, affinity and cgroup quota; one inter-op thread, sequential; every graph optimisation), and the
graph is the one the edge picks (``--precision auto``: the bundle's int8 variant where its measured
agreement with fp32 is ≥ 0.97, see ``palettelink int8``); the report names both, and the codec's
overhead (coding time as a share of the ONNX graph's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import cpu as _cpu
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
    p.add_argument("--no-front", action="store_true",
                   help="skip the bare front (front.onnx) run that the codec overhead is measured against")
    p.add_argument("--precision", choices=("auto", "fp32", "int8"), default="auto",
                   help="edge graph precision: auto (the default, as the edge client: the bundle's int8 "
                        "graph where its measured agreement is ≥ 0.97), fp32 or int8")
    p.add_argument("--canvas", choices=("window", "square"), default="window",
                   help="palette codec: the frame's window of the letterbox (default, what the edge sends a "
                        "server that decodes windows, where the bundle can) or the whole square")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench-edge.json")


def usable_cpus() -> int:
    return _cpu.usable_cpus()


def cpu_model() -> str:
    return _cpu.cpu_model()


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
            repeat: int, front: Any = None) -> dict[str, Any]:
    """``warmup`` untimed encodes, then ``repeat`` timed ones cycling over ``frames``: per-stage
    samples (ms) and stats, and the payload sizes. With ``front`` (a :class:`palettelink.front.Front`),
    each frame is also run through the bare front (letterbox included), interleaved so that both see
    the same load: the reference the codec's overhead is measured against."""
    for i in range(warmup):
        encoder.encode(frames[i % len(frames)][1], level)
        if front is not None:
            front.run(frames[i % len(frames)][1])
    samples: dict[str, list[float]] = {"prep": [], "onnx": [], "coding": [], "total": [], "cpu": []}
    if front is not None:
        samples["front"] = []
    sizes = []
    for i in range(repeat):
        rgb = frames[(warmup + i) % len(frames)][1]
        if front is not None:
            t0 = time.perf_counter()
            front.run(rgb)
            samples["front"].append((time.perf_counter() - t0) * 1e3)
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
    # the coding again, on fresh analyses, in CPU time of this thread (numpy and constriction code on
    # the calling thread): what coding costs a free core, whatever else runs on the box
    samples["coding_cpu"] = []
    for i in range(min(repeat, 10)):
        analysis = encoder.analyse(frames[(warmup + i) % len(frames)][1])
        c0 = time.thread_time()
        encoder.encode_analysis(analysis, level)
        samples["coding_cpu"].append((time.thread_time() - c0) * 1e3)
    return {"stages": {k: {**stats(v), "samples_ms": [round(x, 3) for x in v]} for k, v in samples.items()},
            "bytes_median": int(np.median(sizes)), "level": enc.level}


STAGE_NAMES = {"prep": "prep (letterbox, copies)", "onnx": "ONNX graph (front{})", "coding": "coding",
               "total": "total per frame", "cpu": "CPU time (all threads)",
               "front": "bare front (reference)", "coding_cpu": "coding, CPU time"}


def run(args: argparse.Namespace) -> int:
    from palettelink import __version__

    if args.warmup < 0 or args.repeat < 3 or (args.threads is not None and args.threads < 1):
        raise InvalidRequest("--repeat must be ≥ 3, --warmup ≥ 0, --threads ≥ 1")
    frames = frames_at(args.images or ["samples:"], args.size)  # inputs first: nothing measured yet
    bundle = _bundle(args)

    import onnxruntime as ort

    from palettelink.codecs import default_codec, make_encoder
    from palettelink.codecs.palette.window import use_window
    from palettelink.front import session_settings, set_session_defaults

    threads = args.threads or usable_cpus()
    set_session_defaults(threads, spinning=args.spin, precision=args.precision)
    codec = args.codec or default_codec(bundle)
    encoder = make_encoder(bundle, codec)
    canvas = "window" if use_window(encoder, args.canvas == "window") else "square"
    graph = getattr(encoder, "graph", None) or getattr(getattr(encoder, "front", None), "graph", None)
    if args.level is not None and args.level not in encoder.levels():
        raise InvalidRequest(f"--level {args.level} is not offered by the {codec} codec; its levels are "
                             f"{sorted(encoder.levels())}")
    bare = None
    if not args.no_front and codec != "baseline" and bundle.has_file("front.onnx"):
        from palettelink.front import Front

        bare = Front(bundle)  # the same precision rule (front.onnx or its recorded int8 variant)
    cpu, cpus = cpu_model(), usable_cpus()
    load_before = _load()
    t0 = time.perf_counter()
    result = measure(encoder, frames, args.level, args.warmup, args.repeat, bare)
    wall = time.perf_counter() - t0
    load_after = _load()
    total = result["stages"]["total"]
    report: dict[str, Any] = {
        "palettelink": __version__, "bundle": bundle.id, "codec": codec, "level": result["level"],
        "size": list(args.size), "input": bundle.input_size, "canvas": canvas,
        "frames": [name for name, _ in frames],
        "cpu": cpu, "usable_cpus": cpus, "online_cpus": os.cpu_count(), "threads": threads,
        "cpus": _cpu.describe(), "session": session_settings(threads),
        "graph": None if graph is None else {"file": graph.file, "precision": graph.precision,
                                             "reason": graph.reason, "int8_agreement": graph.agreement},
        "spinning": bool(args.spin), "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "machine": platform.machine(),
        "load_average_before": load_before, "load_average_after": load_after,
        "warmup": args.warmup, "repeat": args.repeat, "wall_s": round(wall, 2),
        "stages": result["stages"], "bytes_median": result["bytes_median"],
        "fps": round(1e3 / total["median_ms"], 2) if total["median_ms"] > 0 else None,
        "fps_p10_p90": [round(1e3 / total["p90_ms"], 2) if total["p90_ms"] > 0 else None,
                        round(1e3 / total["p10_ms"], 2) if total["p10_ms"] > 0 else None],
        "coding_overhead_pct": (round(100.0 * result["stages"]["coding"]["median_ms"]
                                      / result["stages"]["onnx"]["median_ms"], 1)
                                if result["stages"]["onnx"]["median_ms"] > 0 else None),
        "front_graph": None if bare is None else {"file": bare.graph.file, "precision": bare.graph.precision,
                                                  "reason": bare.graph.reason},
        "codec_overhead_pct": (round(100.0 * (total["median_ms"] - result["stages"]["front"]["median_ms"])
                                     / result["stages"]["front"]["median_ms"], 1)
                               if "front" in result["stages"] else None),
    }
    w, h = args.size
    print(f"bench-edge {bundle.id}: {codec} level {result['level']}, {len(frames)} frame(s) at {w}x{h} "
          f"({', '.join(report['frames'][:4])}{', …' if len(frames) > 4 else ''}) letterboxed to "
          f"{bundle.input_size}²" + (", the frame's window of it coded" if canvas == "window" else ""))
    limit = report["cpus"]["cgroup_cpu_limit"]
    print(f"  CPU {cpu}: {cpus} usable of {os.cpu_count()} online"
          f"{'' if limit is None else f' (cgroup quota {limit:g} CPUs)'}; onnxruntime {ort.__version__} "
          f"CPU, {threads} intra-op thread(s), 1 inter-op, spinning {'on' if args.spin else 'off'}; load "
          f"average {load_before} before, {load_after} after")
    if graph is not None:
        print(f"  graph {graph.file} ({graph.reason})")
    print(f"  {args.warmup} warm-up frame(s), then {args.repeat} timed ({wall:.1f} s):")
    print(f"    {'stage':<30}{'median ms':>10}{'p10–p90 ms':>18}{'spread':>9}")
    for key, st in result["stages"].items():
        name = STAGE_NAMES[key].format("" if codec == "baseline" else " + encoder")
        rng = f"{st['p10_ms']:.1f}–{st['p90_ms']:.1f}"
        print(f"    {name:<30}{st['median_ms']:>10.1f}{rng:>18}{st['spread_pct']:>8.1f}%")
    cpu_ms = result["stages"]["cpu"]["median_ms"]
    report["cpu_fps_per_core"] = round(1e3 / cpu_ms, 2) if cpu_ms > 0 else None
    lo, hi = report["fps_p10_p90"]
    print(f"  {report['fps']} fps at the median ({lo}–{hi} at p90–p10 frame times); coding is "
          f"{report['coding_overhead_pct']} % of the ONNX graph's time")
    if bare is not None:
        print(f"  codec overhead: {report['codec_overhead_pct']} % over the bare front ({bare.graph.file}, "
              f"{bare.graph.precision}; total per frame vs letterbox + front)")
    print(f"  {report['bytes_median']:,} B per frame; the work is "
          f"{cpu_ms:.0f} CPU-ms per frame ({report['cpu_fps_per_core']} fps per free core: the figure that "
          "other work on the box moves least)")
    if cpus and load_before is not None and max(load_before, load_after or 0) > 0.5 * cpus:
        print(f"  note: the load average is over half the {cpus} CPU(s): other work competes for them, and "
              "these figures move with it")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-edge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench-edge.json'}")
    return 0
