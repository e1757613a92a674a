"""``palettelink int8``: an int8 variant of a bundle's edge graph, measured, recorded in its manifest.

What is made, how it is measured and what is recorded: :mod:`palettelink.train.int8_edge` (which
``palettelink build-bundle`` runs on the bundles it builds). This command runs it on an existing bundle,
for one graph (``--graph``; ``decoder.onnx``: an image bundle's generator,
:mod:`palettelink.bench.int8_decoder`), with ``--dry-run`` to measure without changing the bundle and
``--out`` to keep the record as JSON. Needs the ``train`` extra (onnx, torch for the detector's tail).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
    from palettelink.train.int8_edge import make, record, verdict
    from palettelink.train.onnx_int8 import int8_name

    if graph == "decoder.onnx":
        from palettelink.bench import int8_decoder

        return int8_decoder.run(args, bundle)
    file = int8_name(graph)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / file
        entry = make(bundle, graph, candidate, args.calibration, args.frames, args.level, args.threads)
        if entry is None:
            raise InvalidRequest("no training images or no leave-source-out frames on this machine (install "
                                 "opencv-doc, or gather the corpus with `palettelink corpus`)")
        for k in ("agreement", "ap50_fp32", "ap50_int8", "retained", "index_agreement", "fp32_ms", "int8_ms"):
            if k in entry:
                print(f"  {k:<16} {entry[k]}")
        outcome = "runs int8 by default" if entry["default"] else "keeps fp32 by default"
        print(f"  {verdict(entry)}: the edge {outcome}")
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
