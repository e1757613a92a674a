"""The held-out training curve: AP50 of the bottleneck (z unquantised) on leave-source-out frames
against the CPU-minutes spent training it.

Training copies its checkpoint now and then (``checkpoint.pt`` of ``train_bottleneck``; the file
name carries the trainer's CPU seconds, ``<stage>-cpu<seconds>.pt``); this module scores each copy on
a fixed subset of the leave-source-out set (every ``--every``-th eval item) and writes
``heldout_curve.json`` and ``heldout_curve.png``. It reports; it does not choose: the checkpoint
that trains on is the last one, whatever the curve says, so the eval set never tunes the codec.

    python -m palettelink.train.curve .cache/snapshots --out docs/results/lso

A run continued in a later session extends the curve: ``--previous`` keeps an earlier report's rows
(snapshots scored then are not scored again; their files need not exist any more).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np


def _models(state: dict[str, Any]) -> tuple[Any, Any]:
    from palettelink.train.bottleneck import BottleneckConfig, Decoder, Encoder, sync_level_rows

    cfg = BottleneckConfig.from_dict(state["cfg"])
    enc, dec = Encoder(cfg), Decoder(cfg)
    enc.load_state_dict(state["enc"])
    dec.load_state_dict(state["dec"])
    sync_level_rows(dec)
    return enc.eval(), dec.eval()


def score_snapshots(folder: Path, every: int = 3, bundle: str = "fall-yolov8",
                    skip: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Score every ``<stage>-cpu<seconds>.pt`` in ``folder`` but those named in ``skip``."""
    import torch

    from palettelink.bundle import find_bundle
    from palettelink.models.ultra import SplitDetector
    from palettelink.scoring import evaluate
    from palettelink.train import crossing_cache, data

    b = find_bundle(bundle)
    det = SplitDetector.from_bundle(b, "cpu")
    items = data.eval_images()[::every]
    cache = crossing_cache.CrossingCache(det, items, b.input_size, augment=0, cache_dir=folder / "eval-cache",
                                         progress=False)
    refs, views = [], []
    with torch.inference_mode():
        for i in range(len(cache)):
            ts = [t.float() for t in cache.batch([i])]
            lb = cache.letterbox(i)
            refs.append(det.postprocess(det.tail(ts), lb, conf=0.25))
            views.append((ts, lb))
    rows = []
    seen_steps: set[tuple[str, int]] = set()
    snapshots = [f for f in folder.glob("*-cpu*.pt") if f.name not in skip]
    for f in sorted(snapshots, key=lambda p: int(re.search(r"cpu(\d+)", p.name).group(1))):
        state = torch.load(f, map_location="cpu", weights_only=False)
        stage = f.name.split("-cpu")[0]
        if (stage, int(state["step"])) in seen_steps:
            continue
        seen_steps.add((stage, int(state["step"])))
        enc, dec = _models(state)
        with torch.inference_mode():
            preds = [det.postprocess(det.tail(dec(enc(ts), None)), lb, conf=0.001) for ts, lb in views]
        ap = evaluate(refs, preds)
        cpu_s = int(re.search(r"cpu(\d+)", f.name).group(1))
        rows.append({"snapshot": f.name, "stage": stage, "step": int(state["step"]),
                     "train_wall_minutes": round(float(state["elapsed"]) / 60, 2),
                     "process_cpu_minutes": round(cpu_s / 60, 1), "ap50": round(float(ap.ap50), 4)})
        print(f"{f.name}: step {rows[-1]['step']}, AP50 {rows[-1]['ap50']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("snapshots", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--every", type=int, default=3, help="every N-th leave-source-out item")
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name or folder whose detector scores")
    p.add_argument("--previous", type=Path, metavar="JSON",
                   help="an earlier heldout_curve.json whose rows are kept (a run continued later)")
    p.add_argument("--cpu-offset", type=float, default=0.0, metavar="MIN",
                   help="CPU minutes spent before these snapshots' run (a warm start's earlier runs), "
                        "added to their rows")
    a = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    if a.previous:
        rows = list(json.loads(a.previous.read_text())["rows"])
    new = score_snapshots(a.snapshots, a.every, a.bundle, skip={r["snapshot"] for r in rows})
    for r in new:
        r["process_cpu_minutes"] = round(r["process_cpu_minutes"] + a.cpu_offset, 1)
    rows += new
    rows.sort(key=lambda r: r["process_cpu_minutes"])
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"what": "AP50 of z unquantised (bottleneck only) vs the uncompressed detector, on every "
                      f"{a.every}-th leave-source-out eval item; CPU minutes of the training process "
                      "(cache building included, 2 cores)", "rows": rows}
    (a.out / "heldout_curve.json").write_text(json.dumps(report, indent=2) + "\n")
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        for stage in dict.fromkeys(r["stage"] for r in rows):
            pts = [(r["process_cpu_minutes"], r["ap50"]) for r in rows if r["stage"] == stage]
            ax.plot(*np.asarray(pts).T, marker="o", label=stage)
        ax.set_xlabel("CPU minutes of the training process")
        ax.set_ylabel("held-out AP50 (z unquantised)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(a.out / "heldout_curve.png", dpi=120)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
