"""The server graphs of an ultralytics bundle at int8, measured against the torch path and kept only
where the detections agree (issue 17): ``palettelink build-bundle`` runs this after exporting
``tail.onnx`` (``--no-server-int8`` skips it; the Python API asks with ``server_int8=True``).

1. **Quantise** ``decoder.onnx`` (the palette feature decoder) and ``tail.onnx`` like the edge graphs
   (:func:`palettelink.train.onnx_int8.quantise`: onnxruntime static QDQ, convolutions only,
   per-channel int8 weights, uint8 activations; the tail's prediction convolutions stay fp32:
   :func:`linear_convs`), calibrated on ``calibration`` training images of the
   detector codec (never a leave-source-out frame): the decoder on their latents coded at every offered
   level and cut to each frame's window, the tail on the decoded tensors and on the uncompressed
   front's (what the baseline codec carries).
2. **Measure** on the leave-source-out frames (:func:`palettelink.train.data.eval_images`, the set
   ``palettelink int8`` measures the edge graphs on), each coded at the codec's default level (and at
   baseline 4 bits for the tail): the reference is the torch path (the library decoder on the whole
   latent, the torch tail, boxes ≥ 0.25), the onnxruntime configurations (fp32 on the window, then
   int8 decoder + tail, int8 tail, int8 decoder until one agrees; ``every``: all of them and fp32 on
   the whole latent) are scored against it by AP50 of their boxes
   (:func:`palettelink.scoring.evaluate`), and timed.
3. **Keep** the fastest int8 configuration whose agreement on every codec is ≥
   :data:`palettelink.models.ultra_ort.SERVER_INT8_MIN_AGREEMENT`: its files go into the bundle and
   ``serve.int8`` (``default: true``, the path's agreement); the whole table goes to
   ``serve.measurement``. None reaching it: the server runs fp32 onnxruntime.
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


def torch_reference(bundle: Bundle, payloads: Sequence[bytes], conf: float = 0.001) -> list[list[Any]]:
    """The torch path's boxes: the library decoder on the whole latent, the torch tail."""
    from palettelink.codecs import Decoder
    from palettelink.image import letterbox_info
    from palettelink.models.ultra import SplitDetector

    det = SplitDetector.from_bundle(bundle)
    dec = Decoder(bundle)
    out = []
    for p in payloads:
        d = dec.decode(p)
        out.append(det.detect_tensors(d.tensors, letterbox_info(*d.image_size, bundle.input_size), conf=conf))
    return out


def agreement(reference: Sequence[Sequence[Any]], predictions: Sequence[Sequence[Any]]) -> float | None:
    """AP50 of ``predictions`` against the reference's boxes scoring ≥ 0.25 (None: no such box)."""
    from palettelink.scoring import evaluate

    refs = [[b for b in r if b.score >= KEEP_SCORE] for r in reference]
    ap = float(evaluate(refs, [list(p) for p in predictions]).ap50)
    return None if ap != ap else round(ap, 4)


def _feeds(bundle: Bundle, rgbs: Sequence[np.ndarray], levels: Sequence[int], threads: int | None
           ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Calibration feeds: the decoder's (windowed latents, every level in turn) and the tail's (the
    decoded tensors and the uncompressed front's)."""
    from palettelink import bitstream
    from palettelink.codecs import make_encoder
    from palettelink.front import Front
    from palettelink.image import letterbox
    from palettelink.models.windowed_palette import WindowedPaletteDecoder

    names = [t.name for t in bundle.tensors]
    dec_feeds, tail_feeds = [], []
    front = Front(bundle, threads, precision="fp32")
    dec = WindowedPaletteDecoder(bundle, threads, precision="fp32") if "palette" in bundle.codecs else None
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
    del frames_rgb
    refs = {c: torch_reference(bundle, p) for c, p in payloads.items()}

    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        for g in graphs:
            t0 = time.perf_counter()
            files[g] = Path(tmp) / int8_name(g)
            if g == "decoder.onnx":
                quantise(bundle.file(g), files[g], dec_feeds)
            else:
                quantise(bundle.file(g), files[g], tail_feeds, exclude=linear_convs(bundle.file(g)))
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
                row[codec] = {"agreement": agreement(refs[codec], [g[0] for g in got]),
                              "decoder_ms": round(statistics.median(g[1] for g in got), 1),
                              "tail_ms": round(statistics.median(g[2] for g in got), 1)}
            scored = [v["agreement"] for k, v in row.items() if k in payloads and v["agreement"] is not None]
            row["agreement"] = min(scored) if scored else None
            table[name] = row
            log(f"  {name:<20} agreement {row['agreement']}  " + "  ".join(
                f"{c}: decoder {v['decoder_ms']} ms tail {v['tail_ms']} ms" for c, v in row.items()
                if c in payloads))
            # the fastest int8 configuration that agrees: both, else the tail (the larger), else the decoder
            if (chosen is None and (d8 or t8) and row["agreement"] is not None
                    and row["agreement"] >= SERVER_INT8_MIN_AGREEMENT):
                chosen = name
        entries: dict[str, Any] = {}
        if chosen is not None:
            for g in table[chosen]["int8"]:
                shutil.copyfile(files[g], bundle_dir / int8_name(g))
                entries[g] = {"file": int8_name(g), "default": True, "agreement": table[chosen]["agreement"],
                              "configuration": chosen}
        log(f"  kept: {chosen or 'none (fp32)'} (rule: agreement ≥ {SERVER_INT8_MIN_AGREEMENT} on every "
            "codec)")
    measurement = {
        "metric": "AP50 of each onnxruntime configuration's boxes against the torch path's (library "
                  f"decoder on the whole latent, torch tail; boxes ≥ {KEEP_SCORE}), leave-source-out set",
        "threshold": SERVER_INT8_MIN_AGREEMENT, "chosen": chosen, "configurations": table,
        "frames": len(eval_items), "sources": data.describe_sources(eval_items),
        "calibration_images": len(calib_items),
        "palette_level": make_encoder(bundle, "palette").default_level() if has_palette else None,
        "baseline_bits": 4,
        "quantisation": "onnxruntime static QDQ, Conv only, per-channel int8 weights, uint8 activations; "
                        "the tail's convolutions without an activation (head predictions, DFL) kept fp32"}
    return {"int8": entries, "measurement": measurement}
