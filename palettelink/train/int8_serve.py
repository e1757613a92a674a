"""The server graphs of an ultralytics bundle at int8, measured against the torch path and kept only
where the detections agree (issue 17): ``palettelink build-bundle`` runs this after exporting
``tail.onnx`` (``--no-server-int8`` skips it; the Python API asks with ``server_int8=True``).

1. **Quantise** ``decoder.onnx`` (the palette feature decoder) and ``tail.onnx`` like the edge graphs
   (:func:`palettelink.train.onnx_int8.quantise`: onnxruntime static QDQ, convolutions only,
   per-channel int8 weights, uint8 activations at each activation's 99.999th percentile), calibrated
   on ``calibration`` training images of the detector codec (never a leave-source-out frame): the
   decoder on their whole latents coded at every offered level, the tail on the decoded tensors and on
   the uncompressed front's (what the baseline codec carries). Two sets of convolutions stay fp32,
   those whose outputs are the graph's answer with no activation after them: the decoder's last
   convolution of each head (:func:`output_convs`: they make the crossing tensors the tail reads) and
   the tail's prediction convolutions (:func:`linear_convs`). Chosen on 32 training images neither
   calibrated on nor evaluated on, against the fp32 onnxruntime path (p15's bundle): min–max with
   every convolution int8 (the rule before) left the decoded tensors 2.9 % off (relative L2) and the
   class scores 0.0025 off (mean over anchors the fp32 path scores above 0.01); the heads' last
   convolutions fp32 halved the tensors' error (1.4 %), percentile calibration cut the scores' by a
   third (0.0017), and together 1.3 % / 0.0017. Percentile calibration needs activations of one shape,
   hence whole latents (an activation's range does not depend on the window it is read in).
2. **Measure** on the leave-source-out frames (:func:`palettelink.train.data.eval_images`, the set
   ``palettelink int8`` measures the edge graphs on), each coded at the codec's default level (and at
   baseline 4 bits for the tail) by the edge's default graph: the onnxruntime configurations (fp32 on
   the window, then int8 decoder + tail, int8 tail, int8 decoder until one passes; ``every``: all of
   them and fp32 on the whole latent) are scored by AP50 of their boxes
   (:func:`palettelink.scoring.evaluate`) against two references and timed: ``agreement`` against
   the torch path (the library decoder on the whole latent, the torch tail, boxes ≥ 0.25), and
   ``retained``, their AP50 against the uncompressed pipeline (``front.onnx`` → torch tail, boxes ≥
   0.25) over the torch path's. Agreement alone is blind to what the codec keeps only at low scores:
   the rule before kept an int8 path agreeing 0.999 that cost 0.008 AP50 against the uncompressed
   pipeline (0.951 → 0.943 with the fp32 edge graph, p15).
3. **Keep** the fastest int8 configuration whose agreement on every codec is ≥
   :data:`palettelink.models.ultra_ort.SERVER_INT8_MIN_AGREEMENT` and whose retained is ≥
   :data:`palettelink.front.INT8_MIN_RETAINED` (the edge's rule: int8 costs at most 1 % of the
   AP50): its files go into the bundle and ``serve.int8`` (``default: true``, the path's agreement and
   retained); the whole table goes to ``serve.measurement``. None passing: the server runs fp32
   onnxruntime.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.train.onnx_int8 import int8_name

GRAPHS = ("decoder.onnx", "tail.onnx")
CALIBRATION = "percentile"
ELEMENTWISE = ("Mul", "Add", "Div", "Sub", "Identity")  # what output_convs walks back through
QUANTISATION = ("onnxruntime static QDQ, Conv only, per-channel int8 weights, uint8 activations at the "
                "99.999th percentile; the decoder's output convolutions and the tail's convolutions "
                "without an activation (head predictions, DFL) kept fp32")
KEEP_SCORE = 0.25  # reference boxes: what the server reports by default


def linear_convs(path: Path) -> list[str]:
    """Convolutions not followed by an activation (SiLU is exported as Sigmoid + Mul): in the YOLO tail
    the head's box and class predictions and the DFL's expectation, whose outputs are the detections
    themselves. Quantising them costs agreement (on 30 leave-source-out frames, AP50 vs the torch path
    0.993 → 0.997 with them fp32) for ~10 % of the int8 tail's time; they stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    return [n.name for n in graph.node
            if n.op_type == "Conv" and "Sigmoid" not in consumers.get(n.output[0], [])]


def output_convs(path: Path) -> list[str]:
    """The convolutions whose outputs reach the graph's outputs through elementwise operations only
    (the decoder's last convolution of each head, before its scale): their rounding is the crossing
    tensors' own error. They stay fp32 (module docstring)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for out in graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type != "Conv":
            node = producer.get(node.input[0]) if node.op_type in ELEMENTWISE and node.input else None
        if node is not None and node.name not in found:
            found.append(node.name)
    return found



class ServePath:
    """One server configuration: the windowed palette decoder and the onnxruntime tail, each from a
    given file (fp32 or a candidate int8 one)."""

    def __init__(self, bundle: Bundle, decoder_file: Path | None, tail_file: Path | None, window: bool,
                 threads: int | None) -> None:
        from palettelink.codecs import Decoder
        from palettelink.models.ultra_ort import OrtTail, server_session
        from palettelink.models.windowed_palette import WindowedPaletteDecoder

        self.bundle = bundle
        self.tail = OrtTail(bundle, threads, precision="fp32")
        if tail_file is not None:
            self.tail.session = server_session(str(tail_file), threads)
        overrides: dict[str, Any] = {}
        if "palette" in bundle.codecs:
            dec = WindowedPaletteDecoder(bundle, threads, precision="fp32", window=window)
            if decoder_file is not None:
                dec.session = server_session(str(decoder_file), threads)
            overrides["palette"] = dec
        self.decoder = Decoder(bundle, overrides)

    def detect(self, payload: bytes, conf: float = 0.001) -> tuple[list[Any], float, float]:
        """Boxes of one frame, the decoder network's ms and the tail's ms."""
        from palettelink.image import letterbox_info, window_letterbox
        from palettelink.models.ultra import postprocess

        d = self.decoder.decode(payload)
        t0 = time.perf_counter()
        preds = self.tail.run(d.tensors)
        tail_ms = (time.perf_counter() - t0) * 1e3
        lb = window_letterbox(letterbox_info(*d.image_size, self.bundle.input_size), d.window)
        return postprocess(preds, lb, conf), float(d.timings_ms.get("decoder_ms", 0.0)), tail_ms


def torch_reference(bundle: Bundle, payloads: Sequence[bytes], conf: float = 0.001,
                    det: Any = None) -> list[list[Any]]:
    """The torch path's boxes: the library decoder on the whole latent, the torch tail (``det``, a
    :class:`~palettelink.models.ultra.SplitDetector`; loaded here where not given)."""
    from palettelink.codecs import Decoder
    from palettelink.image import letterbox_info
    from palettelink.models.ultra import SplitDetector

    det = det if det is not None else SplitDetector.from_bundle(bundle)
    dec = Decoder(bundle)
    out = []
    for p in payloads:
        d = dec.decode(p)
        out.append(det.detect_tensors(d.tensors, letterbox_info(*d.image_size, bundle.input_size), conf=conf))
    return out


def uncompressed_reference(det: Any, front: Any, rgbs: Sequence[np.ndarray],
                           conf: float = 0.001) -> list[list[Any]]:
    """The uncompressed pipeline's boxes: ``front`` (an fp32 :class:`~palettelink.front.Front`) on the
    letterbox, then ``det``'s torch tail (a :class:`~palettelink.models.ultra.SplitDetector`); the
    caller's own, so a measurement that also needs them loads each once."""
    from palettelink.image import letterbox

    out = []
    for rgb in rgbs:
        x, lb = letterbox(rgb, front.bundle.input_size)
        out.append(det.detect_tensors(front.run_tensor(x), lb, conf=conf))
    return out


def passes(row: dict[str, Any]) -> bool:
    """The server's int8 rule (module docstring) for one measured configuration: the edge's rule
    (:func:`palettelink.front.int8_passes`) at the server's agreement bound, retained measured."""
    from palettelink.front import int8_passes
    from palettelink.models.ultra_ort import SERVER_INT8_MIN_AGREEMENT

    return row.get("retained") is not None and int8_passes(row, SERVER_INT8_MIN_AGREEMENT)


def agreement(reference: Sequence[Sequence[Any]], predictions: Sequence[Sequence[Any]]) -> float | None:
    """AP50 of ``predictions`` against the reference's boxes scoring ≥ 0.25 (None: no such box): the
    torch path's (``agreement``) or the uncompressed pipeline's (``ap50``, hence ``retained``)."""
    from palettelink.scoring import evaluate

    refs = [[b for b in r if b.score >= KEEP_SCORE] for r in reference]
    ap = float(evaluate(refs, [list(p) for p in predictions]).ap50)
    return None if ap != ap else round(ap, 4)


def _feeds(bundle: Bundle, rgbs: Sequence[np.ndarray], levels: Sequence[int], threads: int | None
           ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Calibration feeds: the decoder's (whole latents, every level in turn) and the tail's (the
    decoded tensors and the uncompressed front's)."""
    from palettelink import bitstream
    from palettelink.codecs import make_encoder
    from palettelink.front import Front
    from palettelink.image import letterbox
    from palettelink.models.windowed_palette import WindowedPaletteDecoder

    names = [t.name for t in bundle.tensors]
    dec_feeds, tail_feeds = [], []
    front = Front(bundle, threads, precision="fp32")
    # whole latents: percentile calibration stacks each activation's values, so they need one shape
    dec = (WindowedPaletteDecoder(bundle, threads, precision="fp32", window=False)
           if "palette" in bundle.codecs else None)
    enc = make_encoder(bundle, "palette") if dec is not None else None
    for k, rgb in enumerate(rgbs):
        x = letterbox(rgb, bundle.input_size)[0]
        tail_feeds.append(dict(zip(names, front.run_tensor(x), strict=True)))
        if dec is None or enc is None:
            continue
        frame = bitstream.unpack(enc.encode(rgb, int(levels[k % len(levels)])).payload)
        z, level, _, _ = dec.latent(frame)
        feed = {"z": z, "level": np.asarray(level, np.int64)}
        dec_feeds.append(feed)
        tail_feeds.append(dict(zip(dec.outputs, dec.session.run(dec.outputs, feed), strict=True)))
    return dec_feeds, tail_feeds


def build(bundle_dir: Path, calibration: int = 24, frames: int = 0, threads: int | None = None,
          log: Callable[[str], None] = print, every: bool = False) -> dict[str, Any] | None:
    """Quantise, measure and keep (module docstring) in the bundle folder ``bundle_dir`` (its
    manifest already lists tail.onnx). The int8 configurations are measured fastest first and the
    first that agrees ends the search (``every``: measure them all, and fp32 on the whole latent).
    Returns ``{"int8": {...}, "measurement": {...}}`` for the
    manifest's ``serve`` entry (the kept files are written beside it), or None where this machine has
    no calibration images or no leave-source-out frames."""
    from palettelink.codecs import make_encoder
    from palettelink.front import INT8_MIN_RETAINED, Front
    from palettelink.models.ultra import SplitDetector
    from palettelink.models.ultra_ort import SERVER_INT8_MIN_AGREEMENT, tail_file
    from palettelink.train import data
    from palettelink.train.onnx_int8 import quantise

    bundle = Bundle.load(bundle_dir, verify=False)
    tail = tail_file(bundle)
    if tail is None:
        return None
    calib_items = data.spread(data.training_images(), calibration)
    eval_items = data.spread(data.eval_images(), frames)
    if not calib_items or not eval_items:
        log("server int8: no training images or no leave-source-out frames on this machine; fp32 only")
        return None
    has_palette = "palette" in bundle.codecs
    graphs = [g for g in GRAPHS if g == tail or (g == "decoder.onnx" and has_palette)]
    log(f"server int8: calibrating {', '.join(graphs)} on {len(calib_items)} training images, measuring on "
        f"{len(eval_items)} leave-source-out frames")
    rgbs = data.load_all_rgb(calib_items)
    levels = make_encoder(bundle, "palette").levels() if has_palette else [0]
    dec_feeds, tail_feeds = _feeds(bundle, rgbs, levels, threads)
    del rgbs
    frames_rgb = data.load_all_rgb(eval_items)
    payloads: dict[str, list[bytes]] = {}
    if has_palette:
        enc = make_encoder(bundle, "palette")
        payloads["palette"] = [enc.encode(rgb).payload for rgb in frames_rgb]
    base = make_encoder(bundle, "baseline")
    payloads["baseline"] = [base.encode(rgb, 4).payload for rgb in frames_rgb]
    det = SplitDetector.from_bundle(bundle)
    unc = uncompressed_reference(det, Front(bundle, threads, precision="fp32"), frames_rgb)
    del frames_rgb
    refs = {c: torch_reference(bundle, p, det=det) for c, p in payloads.items()}
    ref_ap = {c: agreement(unc, r) for c, r in refs.items()}  # the torch path against the uncompressed one

    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        for g in graphs:
            t0 = time.perf_counter()
            files[g] = Path(tmp) / int8_name(g)
            if g == "decoder.onnx":
                quantise(bundle.file(g), files[g], dec_feeds, exclude=output_convs(bundle.file(g)),
                         calibration=CALIBRATION)
            else:
                quantise(bundle.file(g), files[g], tail_feeds, exclude=linear_convs(bundle.file(g)),
                         calibration=CALIBRATION)
            log(f"  quantised {g} in {time.perf_counter() - t0:.0f} s")
        # name → (window, int8 decoder, int8 tail); the int8 ones in order of preference (fastest first)
        configs: dict[str, tuple[bool, bool, bool]] = {"fp32 window": (True, False, False)}
        if every:
            configs["fp32 whole"] = (False, False, False)
        if "decoder.onnx" in files:
            configs["int8 decoder + tail"] = (True, True, True)
        configs["int8 tail"] = (True, False, True)
        if "decoder.onnx" in files:
            configs["int8 decoder"] = (True, True, False)
        table: dict[str, dict[str, Any]] = {}
        chosen = None
        for name, (window, d8, t8) in configs.items():
            if chosen is not None and not every:
                break  # a faster configuration already agrees
            path = ServePath(bundle, files.get("decoder.onnx") if d8 else None, files[tail] if t8 else None,
                             window, threads)
            row: dict[str, Any] = {"window": window, "int8": [g for g, on in (("decoder.onnx", d8),
                                                                              (tail, t8)) if on]}
            for codec, ps in payloads.items():
                if codec == "baseline" and d8 and not t8:
                    continue  # the decoder network is the palette codec's only
                got = [path.detect(p) for p in ps]
                boxes = [g[0] for g in got]
                ap = agreement(unc, boxes)
                row[codec] = {"agreement": agreement(refs[codec], boxes), "ap50": ap,
                              "retained": (round(ap / ref_ap[codec], 4) if ap is not None and ref_ap[codec]
                                           else None),
                              "decoder_ms": round(statistics.median(g[1] for g in got), 1),
                              "tail_ms": round(statistics.median(g[2] for g in got), 1)}
            for key in ("agreement", "retained"):
                scored = [v[key] for k, v in row.items() if k in payloads and v[key] is not None]
                row[key] = min(scored) if scored else None
            table[name] = row
            log(f"  {name:<20} agreement {row['agreement']} retained {row['retained']}  " + "  ".join(
                f"{c}: AP50 {v['ap50']} decoder {v['decoder_ms']} ms tail {v['tail_ms']} ms"
                for c, v in row.items() if c in payloads))
            # the fastest int8 configuration that passes: both, else the tail (the larger), else the decoder
            if chosen is None and (d8 or t8) and passes(row):
                chosen = name
        entries: dict[str, Any] = {}
        if chosen is not None:
            for g in table[chosen]["int8"]:
                shutil.copyfile(files[g], bundle_dir / int8_name(g))
                entries[g] = {"file": int8_name(g), "default": True, "agreement": table[chosen]["agreement"],
                              "retained": table[chosen]["retained"], "configuration": chosen}
        log(f"  kept: {chosen or 'none (fp32)'} (rule: agreement ≥ {SERVER_INT8_MIN_AGREEMENT} and "
            f"retained ≥ {INT8_MIN_RETAINED} on every codec)")
    measurement = {
        "metric": "agreement: AP50 of each onnxruntime configuration's boxes against the torch path's "
                  f"(library decoder on the whole latent, torch tail; boxes ≥ {KEEP_SCORE}); ap50: against "
                  f"the uncompressed pipeline's (front.onnx, torch tail; boxes ≥ {KEEP_SCORE}); retained: "
                  "that AP50 over the torch path's; leave-source-out set",
        "threshold": SERVER_INT8_MIN_AGREEMENT, "min_retained": INT8_MIN_RETAINED,
        "reference_ap50": ref_ap, "chosen": chosen, "configurations": table,
        "frames": len(eval_items), "sources": data.describe_sources(eval_items),
        "calibration_images": len(calib_items),
        "palette_level": make_encoder(bundle, "palette").default_level() if has_palette else None,
        "baseline_bits": 4,
        "quantisation": QUANTISATION}
    return {"int8": entries, "measurement": measurement}
