"""The edge's novelty on the leave-source-out frames, per source, against the bundle's threshold (the
99th percentile of training views): which frames would the fallback flag, and are they the ones the
codec fails on (per-source AP50: docs/results/lso-deployed/bench.md)?

    python docs/results/novelty-lso/novelty.py > docs/results/novelty-lso/novelty.json
"""

import json
from collections import defaultdict
from pathlib import Path

from palettelink.bundle import Bundle
from palettelink.codecs.palette import PaletteEncoder
from palettelink.train import data


def main() -> None:
    b = Bundle.load(Path("bundles/fall-yolov8/1"), verify=False)
    items = data.spread(data.eval_images(), 0)
    encoders = {"window": PaletteEncoder(b, 2), "square": PaletteEncoder(b, 2)}
    encoders["window"].window = True
    threshold = encoders["window"].novelty_threshold()
    values: dict[str, dict[str, list[float]]] = {c: defaultdict(list) for c in encoders}
    for source, rgb in zip(data.source_names(items), data.load_all_rgb(items), strict=True):
        for canvas, enc in encoders.items():
            values[canvas][source].append(float(enc.analyse(rgb).novelty))
    out = {"bundle": b.id, "table_hash": b.table_hash_hex, "threshold": round(threshold, 4), "sources": {}}
    for source, window in values["window"].items():
        square = values["square"][source]
        out["sources"][source] = {
            "frames": len(window), "window_median": round(sorted(window)[len(window) // 2], 3),
            "window_max": round(max(window), 3), "flagged_window": sum(v > threshold for v in window),
            "square_median": round(sorted(square)[len(square) // 2], 3),
            "flagged_square": sum(v > threshold for v in square)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
