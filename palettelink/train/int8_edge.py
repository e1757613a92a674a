"""The edge graphs of a bundle at int8, measured and recorded in its manifest (issue 17): the palette
codec's ``edge.onnx`` (front, bottleneck encoder, nearest-entry search) and the baseline codec's
``front.onnx``. ``palettelink build-bundle`` runs :func:`build` on the bundle it makes (``--no-edge-int8``
skips it); ``palettelink int8`` (:mod:`palettelink.bench.int8`) runs :func:`make` on an existing one.

1. **Quantise** statically (:func:`palettelink.train.onnx_int8.quantise`: onnxruntime QDQ, per-channel
   int8 weights, uint8 activations, convolutions only: the nearest-entry search's distances stay
   fp32), calibrated on training images (sources the evaluation never uses) at each activation's
   99.999th percentile. Two sets of convolutions stay fp32 (:func:`fp32_convolutions`):
   - those at stride ≤ 4 (the first, high-resolution layers, :data:`FP32_MAX_STRIDE`): their
     activations are the largest, so quantising and dequantising them costs more than int8 saves
     there, and they are the layers whose rounding moves the codes most (measured on training images
     for the p15 codec: quantising only the first layer changed 17 % of the L1 codes, only the
     seventh 3 %);
   - the codec's encoder (``edge.onnx``'s nodes under :data:`ENCODER_SCOPE`): it makes the latent
     whose nearest palette entry is the code, so its rounding turns straight into other codes, and
     at stride 16 it is cheap (about 2 ms of the graph).
   So made, int8 ``edge.onnx`` kept 90 % of the L1 codes of 16 training images it was not
   calibrated on (all-int8, min–max: 50 %; the high-resolution layers fp32: 86 %, with percentile
   calibration 89 %), and it is faster than all-int8: on a 640x512 window, timed side by side, the
   high-resolution layers fp32 took 32 ms against 39 ms all-int8 and 43–47 ms fp32; in bench-edge
   on an idle 2-core box the shipped graph takes 37–39 ms, fp32 50–51 ms.
2. **Measure** on the leave-source-out frames (:func:`palettelink.train.data.eval_images`) as the server
   would see them: each frame coded by the fp32 and by the int8 graph (palette: at the codec's default
   level), decoded, and the detector's tail run on both; the reference is the uncompressed fp32
   pipeline (``front.onnx`` → tail). ``agreement`` is AP50 of the int8 configuration's boxes scored
   against the fp32 configuration's (same codec, same level): how often int8 finds what fp32 finds —
   the figure the edge's rule reads; ``ap50_fp32`` / ``ap50_int8`` are each against the uncompressed
   reference, ``retained`` their ratio; ``*_ci95`` their 95 % bootstrap intervals over the frames
   (resampled within each source) and ``int8_minus_fp32_ci95`` the paired interval of int8's cost
   (the same frames in every draw): whether int8 costs more than the choice of frames moves; the
   graphs' median times on this machine too.
3. **Record** the file on the bundle's edge side and ``int8: {graph: {...}}`` in its manifest
   (rewritten with fresh hashes; the table hash, hence every stream, is unchanged).

The edge (``--precision auto``, the default) runs the int8 graph where ``agreement`` ≥ 0.97
(:data:`palettelink.front.INT8_MIN_AGREEMENT`) and ``retained`` ≥ 0.99
(:data:`palettelink.front.INT8_MIN_RETAINED`: int8 costs at most 1 % of the AP50), else fp32
(:func:`palettelink.front.int8_passes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.train.onnx_int8 import int8_name
from palettelink.train.timing import median_ms

GRAPHS = ("edge.onnx", "front.onnx")
FP32_MAX_STRIDE = 4  # convolutions whose output is at this stride of the input or finer stay fp32
ENCODER_SCOPE = "/enc/"  # torch.onnx names the codec encoder's nodes after EdgeGraph.enc (train/export.py)
CALIBRATION = "percentile"
QUANTISATION = (f"onnxruntime static QDQ, Conv only, per-channel int8 weights, uint8 activations at the "
                f"99.999th percentile; the convolutions at stride ≤ {FP32_MAX_STRIDE} and the codec's "
                "encoder kept fp32")
METRIC = ("AP50 of the int8 configuration's boxes against the fp32 configuration's (same codec and level), "
          "leave-source-out set")


def make(bundle: Bundle, graph: str, dst: Path, calibration: int = 24, frames: int = 0,
         level: int | None = None, threads: int | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Quantise ``graph`` of ``bundle`` into ``dst`` and measure it (module docstring): the manifest
    entry, or None where this machine has no training images or no leave-source-out frames."""
    from palettelink.front import INT8_MIN_AGREEMENT, INT8_MIN_RETAINED, int8_passes
    from palettelink.image import letterbox
    from palettelink.train import data
    from palettelink.train.onnx_int8 import quantise

    calib_items = data.spread(data.training_images(), calibration)
    eval_items = data.spread(data.eval_images(), frames)
    if not calib_items or not eval_items:
        return None
    log(f"int8 {bundle.id} {graph}: calibrating on {len(calib_items)} training images, measuring on "
        f"{len(eval_items)} leave-source-out frames")
    calib = [letterbox(rgb, bundle.input_size)[0] for rgb in data.load_all_rgb(calib_items)]
    extra = {"level": np.asarray(0, np.int64)} if graph == "edge.onnx" else {}
    t0 = time.perf_counter()
    fp32_convs = fp32_convolutions(bundle.file(graph))
    quantise(bundle.file(graph), dst, [{"images": x, **extra} for x in calib], exclude=fp32_convs,
             calibration=CALIBRATION)
    log(f"  quantised in {time.perf_counter() - t0:.0f} s; measuring")
    result = measure(bundle, graph, dst, data.load_all_rgb(eval_items), level, threads,
                     data.source_names(eval_items))
    return {**result, "threshold": INT8_MIN_AGREEMENT, "min_retained": INT8_MIN_RETAINED,
            "default": int8_passes(result), "metric": METRIC,
            "frames": len(eval_items), "sources": data.describe_sources(eval_items),
            "calibration_images": len(calib_items), "quantisation": QUANTISATION,
            "fp32_convolutions": len(fp32_convs)}


def fp32_convolutions(path: Path) -> list[str]:
    """The convolutions of the edge graph at ``path`` that its int8 variant keeps fp32 (module
    docstring): those at stride ≤ FP32_MAX_STRIDE and the codec encoder's."""
    import onnx

    from palettelink.train.onnx_int8 import fine_convolutions

    graph = onnx.load(str(path), load_external_data=False).graph
    fine = fine_convolutions(graph, FP32_MAX_STRIDE)
    encoder = [n.name for n in graph.node if n.op_type == "Conv" and n.name.startswith(ENCODER_SCOPE)]
    return fine + [n for n in encoder if n not in fine]


def build(bundle_dir: Path, calibration: int = 24, frames: int = 0, threads: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`make` for each edge graph of the bundle folder ``bundle_dir`` (edge.onnx where it has the
    palette codec, front.onnx), kept and recorded where it reaches the edge's rule, else removed.
    Returns ``{graph: entry}`` of what was measured (empty where nothing could be)."""
    bundle = Bundle.load(bundle_dir, verify=False)
    made: dict[str, Any] = {}
    for graph in GRAPHS:
        if not bundle.has_file(graph):
            continue
        dst = bundle_dir / int8_name(graph)
        entry = make(bundle, graph, dst, calibration, frames, None, threads, log)
        if entry is None:
            log("edge int8: no training images or no leave-source-out frames on this machine; fp32 only")
            return made
        made[graph] = entry
        if entry["default"]:
            record(bundle_dir, graph, dst.name, entry)
            log(f"  {graph}: int8 {verdict(entry)}: kept (the edge's default)")
        else:
            dst.unlink()
            log(f"  {graph}: int8 {verdict(entry)}: dropped, fp32 stays")
    return made


def verdict(entry: dict[str, Any]) -> str:
    """The rule's two figures for ``entry``, as logs and ``palettelink int8`` print them."""
    from palettelink.front import INT8_MIN_AGREEMENT, INT8_MIN_RETAINED

    def side(value: Any, bound: float) -> str:
        return "≥" if isinstance(value, int | float) and value >= bound else "<"

    agreement = entry["agreement"]
    text = f"agreement {agreement} {side(agreement, INT8_MIN_AGREEMENT)} {INT8_MIN_AGREEMENT}"
    if entry.get("retained") is not None:
        text += (f", retained {entry['retained']} {side(entry['retained'], INT8_MIN_RETAINED)} "
                 f"{INT8_MIN_RETAINED} of fp32's AP50")
    return text


def measure(bundle: Any, graph: str, int8_file: Path, frames: list[np.ndarray], level: int | None,
            threads: int | None, strata: list[str] | None = None) -> dict[str, Any]:
    """The int8 graph against fp32 on ``frames`` (module docstring); ``strata`` names each frame's
    source, which the bootstrap intervals resample within."""
    from palettelink import bitstream
    from palettelink.front import Front, ort_session
    from palettelink.image import letterbox, letterbox_info, rgb_size
    from palettelink.models.ultra import SplitDetector
    from palettelink.scoring import bootstrap_ap50, evaluate
    from palettelink.train.int8_serve import uncompressed_reference

    det = SplitDetector.from_bundle(bundle)
    ref_front = Front(bundle, threads, precision="fp32")
    name = ref_front.input_name
    out: dict[str, Any] = {}

    def kept(boxes: list[Any]) -> list[Any]:
        return [b for b in boxes if b.score >= 0.25]

    uncompressed = uncompressed_reference(det, ref_front, frames)
    refs = [kept(b) for b in uncompressed]
    fp32_all: list[list[Any]] = []
    int8_all: list[list[Any]] = []
    if graph == "edge.onnx":
        from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder

        fp32 = PaletteEncoder(bundle, threads, precision="fp32")
        int8 = PaletteEncoder(bundle, threads, precision="fp32")
        int8.session = ort_session(str(int8_file), threads)  # the candidate, not yet in the manifest
        decoder = PaletteDecoder(bundle, threads)
        level = fp32.default_level() if level is None else level
        # measured on what the edge codes for a server that decodes windows (where the bundle can)
        fp32.window = int8.window = True
        out["codec"], out["level"] = "palette", level
        out["canvas"] = "window" if fp32.window else "square"
        same = []
        for rgb in frames:
            lb = letterbox_info(*rgb_size(rgb), bundle.input_size)
            a32, a8 = fp32.analyse(rgb), int8.analyse(rgb)
            same.append(float(np.mean(a32.indices == a8.indices)))
            for enc, a, sink in ((fp32, a32, fp32_all), (int8, a8, int8_all)):
                payload = enc.encode_analysis(a, level).payload
                dec = decoder.decode_frame(bitstream.unpack(payload), len(payload))
                sink.append(det.detect_tensors(dec.tensors, lb, conf=0.001))
        out["index_agreement"] = round(float(np.mean(same)), 4)
        x0 = letterbox(frames[0], bundle.input_size)[0]
        lv = {"level": np.asarray(0, np.int64)}
        out["fp32_ms"] = median_ms(lambda: fp32.session.run(fp32.outputs, {fp32.input_name: x0, **lv}))
        out["int8_ms"] = median_ms(lambda: int8.session.run(int8.outputs, {int8.input_name: x0, **lv}))
    else:
        sess = ort_session(str(int8_file), threads)
        out["codec"], out["level"] = "uncompressed", None
        fp32_all = uncompressed
        for rgb in frames:
            x, lb = letterbox(rgb, bundle.input_size)
            int8_all.append(det.detect_tensors(sess.run(None, {name: x}), lb, conf=0.001))
        x0 = letterbox(frames[0], bundle.input_size)[0]
        out["fp32_ms"] = median_ms(lambda: ref_front.run_tensor(x0))
        out["int8_ms"] = median_ms(lambda: sess.run(None, {name: x0}))
    out["agreement"] = round(float(evaluate([kept(b) for b in fp32_all], int8_all).ap50), 4)
    out["ap50_fp32"] = round(float(evaluate(refs, fp32_all).ap50), 4)
    out["ap50_int8"] = round(float(evaluate(refs, int8_all).ap50), 4)
    out["retained"] = round(out["ap50_int8"] / out["ap50_fp32"], 4) if out["ap50_fp32"] > 0 else None
    # what the frames' choice alone moves: int8's cost read against it (paired, the same frames)
    if out["retained"] is not None:
        boot = bootstrap_ap50(refs, [fp32_all, int8_all], strata=strata)
        out["ap50_fp32_ci95"], out["ap50_int8_ci95"] = ([round(v, 4) for v in ci] for ci in boot.interval)
        out["int8_minus_fp32_ci95"] = [round(v, 4) for v in boot.difference[1]]
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


