"""``palettelink int8 --graph decoder.onnx``: the int8 variant of an image bundle's generator.

The palette image codec's ``decoder.onnx`` (latent → the 512² picture x̂) is the server's largest cost
per frame. This quantises it like the edge graphs (:func:`quantise`: onnxruntime static QDQ,
convolutions only, per-channel int8 weights, uint8 activations), calibrated on latents of the bundle
codec's own training items (its ``codec/training.json``; never a held-out picture) coded at every
level, then measures it on the codec's leave-source-out set
(:mod:`palettelink.bench.heldout`) as the server would run it: each frame coded at ``--level``,
decoded by the fp32 and by the int8 generator, and every task model of the bundle run on both pictures.

Recorded (``int8: {"decoder.onnx": {...}}`` in the manifest, the file on the server side):

- per task, ``agreement``: the int8 picture's result scored against the fp32 picture's (detect AP50
  with fp32's boxes ≥ 0.3 as reference, segment mask IoU, pose OKS, landmarks ok@0.05), and each
  picture's score against the uncompressed original (``fp32`` / ``int8``);
- ``agreement``: the lowest task agreement: the figure :func:`palettelink.front.choose_graph` reads
  (the server runs int8 where it is ≥ 0.97, else fp32);
- the generator's median time per 512² frame at fp32 and int8 on this machine, and the PSNR of the
  int8 picture against the fp32 one.

Both generators are deterministic for a given machine and onnxruntime build: the stream's symbols are
bit-exact everywhere (golden streams), the picture a float computation (int8 kernels differ between
CPUs with and without VNNI).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from palettelink.errors import InvalidRequest
from palettelink.train.data import spread
from palettelink.train.onnx_int8 import quantise
from palettelink.train.timing import median_ms

GRAPH = "decoder.onnx"
FILE = "decoder.int8.onnx"


def _latent(encoder: Any, decoder: Any, rgb: np.ndarray, level: int) -> dict[str, np.ndarray]:
    """The generator's feed for ``rgb`` coded at ``level``, exactly as the server makes it."""
    from palettelink import bitstream

    frame = bitstream.unpack(encoder.encode(rgb, level).payload)
    r = decoder.decode_indices(frame)
    return {"z": decoder.tables.dequantise(r.indices, r.level), "level": np.asarray(r.level, np.int64)}



def measure(bundle: Any, int8_file: Path, frames: list[np.ndarray], level: int,
            threads: int | None) -> dict[str, Any]:
    """The int8 generator against fp32 on ``frames`` (module docstring)."""
    from palettelink.bench.task_scores import ADAPTERS
    from palettelink.bench.tasks import load_task_models
    from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder
    from palettelink.front import ort_session
    from palettelink.image import letterbox
    from palettelink.models import family_of
    from palettelink.models.image import rebuilt_image

    if family_of(bundle) != "image":
        raise InvalidRequest(f"--graph {GRAPH} measures an image bundle's generator; {bundle.id} is not one")
    tasks = [t for t in bundle.manifest.get("tasks", []) if t in ADAPTERS]
    models = load_task_models(bundle, tasks)
    encoder = PaletteEncoder(bundle, threads, precision="fp32")
    fp32 = PaletteDecoder(bundle, threads, precision="fp32")
    int8 = ort_session(str(int8_file), threads)
    orig: dict[str, list[Any]] = {t: [] for t in tasks}
    ref32: dict[str, list[Any]] = {t: [] for t in tasks}
    out32: dict[str, list[Any]] = {t: [] for t in tasks}
    out8: dict[str, list[Any]] = {t: [] for t in tasks}
    psnr = []
    for rgb in frames:
        _, lb = letterbox(rgb, bundle.input_size)
        feed = _latent(encoder, fp32, rgb, level)
        x32 = fp32.session.run(fp32.outputs, feed)[0]
        x8 = int8.run(None, feed)[0]
        mse = float(np.mean((x32.astype(np.float64) - x8) ** 2))
        psnr.append(99.0 if mse == 0 else 10 * math.log10(1.0 / mse))
        im32, im8 = (rebuilt_image(x, (lb.width, lb.height), bundle.input_size) for x in (x32, x8))
        for t in tasks:
            a = ADAPTERS[t]
            orig[t].append(a.predict(models[t], rgb, True))
            ref32[t].append(a.predict(models[t], im32, True))
            out32[t].append(a.predict(models[t], im32, False))
            out8[t].append(a.predict(models[t], im8, False))
    per_task = {}
    for t in tasks:
        a = ADAPTERS[t]
        per_task[t] = {k: round(float(a.score(r, p)[a.headline]), 4)
                       for k, (r, p) in (("agreement", (ref32[t], out8[t])), ("fp32", (orig[t], out32[t])),
                                         ("int8", (orig[t], out8[t])))}
        per_task[t]["n_reference"] = a.score(orig[t], out32[t]).get("n_reference")
    scored = [v["agreement"] for v in per_task.values() if v["agreement"] == v["agreement"]]
    feed = _latent(encoder, fp32, frames[0], level)
    return {"codec": "palette", "level": level, "tasks": per_task,
            "agreement": round(min(scored), 4) if scored else None,
            "psnr_int8_vs_fp32_db": round(float(np.mean(psnr)), 2),
            "fp32_ms": median_ms(lambda: fp32.session.run(fp32.outputs, feed), digits=1),
            "int8_ms": median_ms(lambda: int8.run(None, feed), digits=1)}


def record(bundle_path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """``int8: {"decoder.onnx": entry}`` in the manifest (the file stays on the server side)."""
    from palettelink.bundle import MANIFEST, write_manifest

    m = json.loads((bundle_path / MANIFEST).read_text())
    m.setdefault("int8", {})[GRAPH] = {"file": FILE, **entry}
    return write_manifest(bundle_path, m)


def run(args: argparse.Namespace, bundle: Any) -> int:
    """``palettelink int8 --graph decoder.onnx`` (arguments of :mod:`palettelink.bench.int8`)."""
    from palettelink.bench.heldout import held_out, training_items
    from palettelink.codecs.palette import PaletteDecoder, PaletteEncoder
    from palettelink.front import INT8_MIN_AGREEMENT
    from palettelink.train import data

    if "palette" not in bundle.codecs or not bundle.has_file(GRAPH):
        raise InvalidRequest(f"bundle {bundle.id} has no palette {GRAPH}")
    encoder = PaletteEncoder(bundle, args.threads, precision="fp32")
    decoder = PaletteDecoder(bundle, args.threads, precision="fp32")
    level = encoder.default_level() if args.level is None else int(args.level)
    levels = encoder.levels()
    calib_items = spread(training_items(bundle), args.calibration)
    if not calib_items:
        raise InvalidRequest(f"none of bundle {bundle.id}'s training items is on this machine to "
                             "calibrate on")
    held = held_out(bundle)
    eval_items = spread(held.items(), args.frames)
    print(f"int8 {bundle.id} {GRAPH}: calibrating on {len(calib_items)} of its codec's training items, "
          f"measuring on {len(eval_items)} leave-source-out frames at level {level}", flush=True)
    feeds = [_latent(encoder, decoder, rgb, levels[k % len(levels)])
             for k, rgb in enumerate(data.load_all_rgb(calib_items))]
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / FILE
        quantise(bundle.file(GRAPH), candidate, feeds)
        result = measure(bundle, candidate, data.load_all_rgb(eval_items), level, args.threads)
        agreement = result["agreement"]
        entry = {**result, "threshold": INT8_MIN_AGREEMENT,
                 "default": bool(agreement is not None and agreement >= INT8_MIN_AGREEMENT),
                 "metric": "lowest task agreement of the int8 generator's picture with the fp32 one's "
                           "(detect AP50, segment IoU, pose OKS, landmarks ok@0.05), leave-source-out set",
                 "frames": len(eval_items), "sources": held.describe()["sources"],
                 "calibration_images": len(calib_items),
                 "quantisation": "onnxruntime static QDQ, Conv only, per-channel int8 weights, uint8 "
                                 "activations"}
        for t, v in result["tasks"].items():
            print(f"  {t:<10} agreement {v['agreement']}  vs original: fp32 {v['fp32']}  int8 {v['int8']}")
        print(f"  generator  fp32 {result['fp32_ms']} ms  int8 {result['int8_ms']} ms  (PSNR int8 vs fp32 "
              f"{result['psnr_int8_vs_fp32_db']} dB)")
        verdict = "runs int8" if entry["default"] else "keeps fp32"
        print(f"  agreement {entry['agreement']} vs the {INT8_MIN_AGREEMENT} rule: the server {verdict}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"bundle": bundle.id, "graph": GRAPH, **entry}, indent=2) + "\n")
            print(f"wrote {args.out}")
        if args.dry_run:
            return 0
        shutil.copyfile(candidate, bundle.path / FILE)
    record(bundle.path, entry)
    print(f"recorded {FILE} in {bundle.path / 'manifest.json'}")
    return 0

