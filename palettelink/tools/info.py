"""``palettelink info``: the bundles under a root, their split tensors, codecs and levels.

Reads manifests only (no ONNX session, no torch), so it answers instantly on an edge device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from palettelink import codecs
from palettelink.bundle import Bundle, default_root, list_bundles
from palettelink.codecs.palette import window as palette_window
from palettelink.errors import BundleError, PaletteLinkError
from palettelink.levels import codec_levels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR",
                   help="bundle root (default: $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of bundle files")



def codec_entry(bundle: Bundle, codec: str) -> dict[str, Any]:
    """One codec of ``bundle``: its manifest levels and its registry capabilities."""
    s = codecs.spec(codec)
    return {"levels": codec_levels(bundle, codec), "progressive": s.progressive, "param": s.param,
            "wire_id": s.wire_id, "exact_sizes": s.exact_sizes, "cut": s.cut,
            "window_latent": palette_window.codec_codes_windows(bundle, codec)}


def describe(bundle: Bundle) -> dict[str, Any]:
    names = codecs.available(bundle)
    return {
        "id": bundle.id, "path": str(bundle.path), "task": bundle.task,
        "tasks": bundle.manifest.get("tasks", [bundle.task]), "class_names": bundle.class_names,
        "input_size": bundle.input_size, "table_hash": bundle.table_hash_hex,
        "split_after_layer": bundle.manifest["split"].get("after_layer"),
        "tensors": [{"name": t.name, "layer": t.layer, "shape": list(t.shape)} for t in bundle.tensors],
        "codecs": {c: codec_entry(bundle, c) for c in names},
        "default_codec": names[0],
        "side": bundle.side,
    }


def load_either_side(path: Path, verify: bool = True) -> Bundle:
    """The whole bundle; or, for an edge-only copy (every server-side file absent, e.g. one fetched
    with ``palettelink-edge --fetch-bundle``), its edge part."""
    try:
        return Bundle.load(path, verify)
    except BundleError:
        edge = Bundle.load(path, verify, side="edge")
        if any((path / f).exists() for f in edge.sides["server"]):
            raise
        return edge


def _level_text(lv: dict[str, Any]) -> str:
    extra = [str(lv["label"])] if lv.get("label") else []
    if lv.get("palette_size"):
        extra.append(f"K={lv['palette_size']}")
    if lv.get("mean_bits") is not None:
        extra.append(f"{lv['mean_bits']:.0f} bits")
    if lv.get("mean_bpp") is not None:
        extra.append(f"{lv['mean_bpp']:.3f} bpp")
    return f"{lv['level']}" + (f" ({', '.join(extra)})" if extra else "")


def run(args: argparse.Namespace) -> int:
    root = args.bundles if args.bundles is not None else default_root()
    found: list[dict[str, Any]] = []
    problems: list[str] = []
    for path in list_bundles(root):
        try:
            found.append(describe(load_either_side(path, verify=not args.no_verify)))
        except PaletteLinkError as e:
            problems.append(f"{path}: {e}")
    if args.json:
        doc = {"root": str(Path(root).resolve()), "bundles": found, "problems": problems}
        print(json.dumps(doc, indent=2))
        return 0 if found or not problems else 2
    print(f"bundle root: {Path(root).resolve()}")
    if not found and not problems:
        print("  no bundles; build one with `palettelink build-bundle"
              + (f" --out {root}`" if args.bundles is not None else "`"))
    for b in found:
        side = ", edge part only" if b["side"] == "edge" else ""
        print(f"\n{b['id']}  ({b['path']}{side})")
        print(f"  task {b['task']}, classes {b['class_names']}, input {b['input_size']}², "
              f"table hash {b['table_hash'][:16]}")
        for t in b["tensors"]:
            print(f"  crossing tensor {t['name']} (layer {t['layer']}): {'x'.join(map(str, t['shape']))}")
        for name, c in b["codecs"].items():
            mark = " (default)" if name == b["default_codec"] else ""
            prog = ", progressive" if c["progressive"] else ""
            prog += ", codes the frame's window" if c.get("window_latent") else ""
            print(f"  codec {name}{mark}{prog}: {c['param']} "
                  f"{', '.join(_level_text(lv) for lv in c['levels'])}")
    for p in problems:
        print(f"\nbroken bundle {p}")
    return 0 if found or not problems else 2
