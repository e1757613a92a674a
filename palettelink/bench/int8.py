"""``palettelink int8``: an int8 variant of a bundle's edge graph, measured, recorded in its manifest.

The edge spends most of a frame in one ONNX graph (the palette codec's ``edge.onnx``: front,
bottleneck encoder, nearest-entry search; the baseline codec's ``front.onnx``). This command:

1. quantises it statically with onnxruntime (QDQ; per-channel int8 weights, uint8 activations;
   the convolutions only: the nearest-entry search's distances stay fp32), calibrated on
   ``--calibration`` training images (sources the evaluation never uses), into ``<graph>.int8.onnx``
   beside it;
2. measures it on the leave-source-out set (``palettelink.train.data.eval_images``: sources the
   codec never trained on; ``--frames`` spreads fewer over it), as the server would see it: each frame
   coded by the fp32 and by the int8 graph (palette: at the codec's default level), decoded, and the
   detector's tail run on both; the reference is the uncompressed fp32 pipeline (``front.onnx`` →
   tail). It records:

   - ``agreement``: AP50 of the int8 configuration's boxes scored against the fp32 configuration's
     (same codec, same level): how often int8 finds what fp32 finds — the figure the edge's rule reads;
   - ``ap50_fp32`` / ``ap50_int8``: each configuration against the uncompressed reference, and
     ``retained`` = ap50_int8 / ap50_fp32;
   - the graphs' median times on this machine, the finest-index agreement (palette) and what it
     was calibrated and measured on;

3. adds the file to the bundle's edge side and the entry ``int8: {graph: {...}}`` to its manifest
   (rewritten with fresh hashes; the table hash, hence every stream, is unchanged).

The edge (``palettelink-edge``, ``bench-edge``; ``--precision auto``, the default) runs the int8
graph where ``agreement`` ≥ 0.97 (:data:`palettelink.front.INT8_MIN_AGREEMENT`), else fp32; ``--precision
int8`` or ``fp32`` overrides. Needs the ``train`` extra (onnx, torch for the detector's tail).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.errors import InvalidRequest

GRAPHS = ("edge.onnx", "front.onnx", "decoder.onnx")  # decoder.onnx: an image bundle's generator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name, name/version or folder")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR",
                   help="bundle root (default: $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--graph", default=None, choices=GRAPHS,
                   help="graph to quantise (default: edge.onnx where the bundle has the palette codec, "
                        "else front.onnx; decoder.onnx: an image bundle's generator, bench/int8_decoder.py)")
    p.add_argument("--calibration", type=int, default=24, metavar="N",
                   help="training images to calibrate on (default 24)")
    p.add_argument("--frames", type=int, default=0, metavar="N",
                   help="held-out frames to measure on, spread over the set (default 0: all)")
    p.add_argument("--level", type=int, default=None,
                   help="palette level to measure at (default: the codec's default level)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: usable CPUs)")
    p.add_argument("--dry-run", action="store_true", help="measure, print, but leave the bundle as it is")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the record as JSON")


def quantise(src: Path, dst: Path, calibration: list[np.ndarray], input_name: str,
             extra: dict[str, np.ndarray] | None = None) -> None:
    """Static QDQ int8 of ``src``'s convolutions, calibrated on ``calibration`` (feeds of
    ``input_name``, plus the constant ``extra`` inputs): the one quantiser of train/onnx_int8.py."""
    from palettelink.train.onnx_int8 import quantise as quantise_feeds

    quantise_feeds(src, dst, [{input_name: x, **(extra or {})} for x in calibration])


def _spread(items: list[Any], n: int) -> list[Any]:
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _median_ms(fn: Any, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 2)


def measure(bundle: Any, graph: str, int8_file: Path, frames: list[np.ndarray], level: int | None,
            threads: int | None) -> dict[str, Any]:
    """The int8 graph against fp32 on ``frames`` (module docstring)."""
    from palettelink import bitstream
    from palettelink.front import Front, ort_session
    from palettelink.image import letterbox
    from palettelink.models.ultra import SplitDetector
    from palettelink.scoring import evaluate

    det = SplitDetector.from_bundle(bundle)
    ref_front = Front(bundle, threads, precision="fp32")
    name = ref_front.input_name
    out: dict[str, Any] = {}

    def kept(boxes: list[Any]) -> list[Any]:
        return [b for b in boxes if b.score >= 0.25]

    refs, fp32_all, int8_all = [], [], []
    if graph == "edge.onnx":
        from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder

        fp32 = PaletteEncoder(bundle, threads, precision="fp32")
        int8 = PaletteEncoder(bundle, threads, precision="fp32")
        int8.session = ort_session(str(int8_file), threads)  # the candidate, not yet in the manifest
        decoder = PaletteDecoder(bundle, threads)
        level = fp32.default_level() if level is None else level
        out["codec"], out["level"] = "palette", level
        same = []
        for rgb in frames:
            x, lb = letterbox(rgb, bundle.input_size)
            refs.append(kept(det.detect_tensors(ref_front.run_tensor(x), lb, conf=0.001)))
            a32, a8 = fp32.analyse(rgb), int8.analyse(rgb)
            same.append(float(np.mean(a32.indices == a8.indices)))
            for enc, a, sink in ((fp32, a32, fp32_all), (int8, a8, int8_all)):
                payload = enc.encode_analysis(a, level).payload
                dec = decoder.decode_frame(bitstream.unpack(payload), len(payload))
                sink.append(det.detect_tensors(dec.tensors, lb, conf=0.001))
        out["index_agreement"] = round(float(np.mean(same)), 4)
        x0 = letterbox(frames[0], bundle.input_size)[0]
        lv = {"level": np.asarray(0, np.int64)}
        out["fp32_ms"] = _median_ms(lambda: fp32.session.run(fp32.outputs, {fp32.input_name: x0, **lv}))
        out["int8_ms"] = _median_ms(lambda: int8.session.run(int8.outputs, {int8.input_name: x0, **lv}))
    else:
        sess = ort_session(str(int8_file), threads)
        out["codec"], out["level"] = "uncompressed", None
        for rgb in frames:
            x, lb = letterbox(rgb, bundle.input_size)
            fp = det.detect_tensors(ref_front.run_tensor(x), lb, conf=0.001)
            refs.append(kept(fp))
            fp32_all.append(fp)
            int8_all.append(det.detect_tensors(sess.run(None, {name: x}), lb, conf=0.001))
        x0 = letterbox(frames[0], bundle.input_size)[0]
        out["fp32_ms"] = _median_ms(lambda: ref_front.run_tensor(x0))
        out["int8_ms"] = _median_ms(lambda: sess.run(None, {name: x0}))
    out["agreement"] = round(float(evaluate([kept(b) for b in fp32_all], int8_all).ap50), 4)
    out["ap50_fp32"] = round(float(evaluate(refs, fp32_all).ap50), 4)
    out["ap50_int8"] = round(float(evaluate(refs, int8_all).ap50), 4)
    out["retained"] = round(out["ap50_int8"] / out["ap50_fp32"], 4) if out["ap50_fp32"] > 0 else None
    out["reference_boxes"] = sum(len(r) for r in refs)
    return out


def record(bundle_path: Path, graph: str, file: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add ``file`` to the bundle's edge side and ``int8: {graph: entry}`` to its manifest."""
    from palettelink.bundle import MANIFEST, write_manifest

    m = json.loads((bundle_path / MANIFEST).read_text())
    m.setdefault("int8", {})[graph] = {"file": file, **entry}
    sides = m.setdefault("sides", {"edge": []})
    sides["edge"] = sorted(set(sides.get("edge", [])) | {file})
    palette = (m.get("codecs") or {}).get("palette")
    if graph == "edge.onnx" and isinstance(palette, dict):
        palette["edge_files"] = sorted(set(palette.get("edge_files", [])) | {file})
    return write_manifest(bundle_path, m)


def run(args: argparse.Namespace) -> int:
    from palettelink.bundle import find_bundle
    from palettelink.front import session_defaults, set_session_defaults

    if args.calibration < 1 or args.frames < 0:
        raise InvalidRequest("--calibration must be ≥ 1 and --frames ≥ 0")
    bundle = find_bundle(args.bundle, args.bundles)
    graph = args.graph or ("edge.onnx" if "palette" in bundle.codecs else "front.onnx")
    if not bundle.has_file(graph):
        raise InvalidRequest(f"bundle {bundle.id} has no {graph}")
    saved = session_defaults()
    set_session_defaults(args.threads, spinning=False)  # (every graph measured names its precision)
    try:
        return _run(args, bundle, graph)
    finally:
        set_session_defaults(**saved)  # type: ignore[arg-type]


def _run(args: argparse.Namespace, bundle: Any, graph: str) -> int:
    from palettelink.front import INT8_MIN_AGREEMENT
    from palettelink.image import letterbox
    from palettelink.train import data

    if graph == "decoder.onnx":
        from palettelink.bench import int8_decoder

        return int8_decoder.run(args, bundle)
    calib_items = _spread(data.training_images(), args.calibration)
    eval_items = _spread(data.eval_images(), args.frames)
    if not calib_items or not eval_items:
        raise InvalidRequest("no training images or no leave-source-out frames on this machine (install "
                             "opencv-doc, or gather the corpus with `palettelink corpus`)")
    print(f"int8 {bundle.id} {graph}: calibrating on {len(calib_items)} training images, measuring on "
          f"{len(eval_items)} leave-source-out frames", flush=True)
    calib = [letterbox(rgb, bundle.input_size)[0] for rgb in data.load_all_rgb(calib_items)]
    file = graph.removesuffix(".onnx") + ".int8.onnx"
    extra = {"level": np.asarray(0, np.int64)} if graph == "edge.onnx" else None
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / file
        t0 = time.perf_counter()
        quantise(bundle.file(graph), candidate, calib, "images", extra)
        print(f"  quantised in {time.perf_counter() - t0:.0f} s; measuring", flush=True)
        frames = data.load_all_rgb(eval_items)
        result = measure(bundle, graph, candidate, frames, args.level, args.threads)
        entry = {**result, "threshold": INT8_MIN_AGREEMENT,
                 "default": bool(result["agreement"] >= INT8_MIN_AGREEMENT),
                 "metric": "AP50 of the int8 configuration's boxes against the fp32 configuration's "
                           "(same codec and level), leave-source-out set",
                 "frames": len(frames), "sources": data.describe_sources(eval_items),
                 "calibration_images": len(calib_items),
                 "quantisation": "onnxruntime static QDQ, Conv only, per-channel int8 weights, uint8 "
                                 "activations"}
        for k in ("agreement", "ap50_fp32", "ap50_int8", "retained", "index_agreement", "fp32_ms", "int8_ms"):
            if k in entry:
                print(f"  {k:<16} {entry[k]}")
        verdict = "runs int8 by default" if entry["default"] else "keeps fp32 by default"
        print(f"  agreement {entry['agreement']} vs the {INT8_MIN_AGREEMENT} rule: the edge {verdict}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            rec = {"bundle": bundle.id, "table_hash": bundle.table_hash_hex, "graph": graph, **entry}
            args.out.write_text(json.dumps(rec, indent=2) + "\n")
            print(f"wrote {args.out}")
        if args.dry_run:
            return 0
        shutil.copyfile(candidate, bundle.path / file)
    record(bundle.path, graph, file, entry)
    print(f"recorded {file} in {bundle.path / 'manifest.json'}")
    return 0
