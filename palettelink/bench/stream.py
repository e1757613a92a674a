"""``palettelink bench-stream``: frames of a video through the real server at ``--kbps`` targets.

What a camera owner sees: the real ``palettelink-server`` and the real ``palettelink-edge`` (its
leaky-bucket rate control), one run per target, against the uncompressed detector on the same frames
(F1 at the deployment threshold, same-class matches at IoU 0.5, class flips counted apart). JPEG at a
few qualities is scored on the same frames for comparison (coded and detected locally: an image
codec needs no server of ours). Prints a table, writes ``bench-stream.json``.

    palettelink bench-stream --video vtest.avi --span 0.7-1.0 --max-frames 60 --kbps 50,100,200,400 --fps 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from palettelink import scoring
from palettelink.bundle import find_bundle
from palettelink.cliutil import floats
from palettelink.errors import InvalidRequest
from palettelink.image import letterbox

DEFAULT_VIDEO = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from palettelink.train.pipeline import parse_span

    p.add_argument("--video", default=DEFAULT_VIDEO, help=f"video file (default {DEFAULT_VIDEO})")
    p.add_argument("--span", type=parse_span, default=(0.7, 1.0), metavar="A-B",
                   help="time range of the video (fractions; default 0.7-1.0, the held-out part of vtest)")
    p.add_argument("--max-frames", type=int, default=60, help="frames spread over the span (default 60)")
    p.add_argument("--bundle", default="fall-yolov8")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR")
    p.add_argument("--codec", default="palette")
    p.add_argument("--kbps", type=floats, default=[50.0, 100.0, 200.0, 400.0])
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--jpeg", type=floats, default=[5.0, 10.0, 20.0], help="JPEG qualities to compare")
    p.add_argument("--conf", type=float, default=0.25, help="deployment score threshold")
    p.add_argument("--out", type=Path, default=Path("bench-out"))


def extract_frames(video: str, span: tuple[float, float], n: int, folder: Path) -> list[Path]:
    """``n`` frames spread over ``span`` of ``video`` as lossless PNGs (the edge reads the folder)."""
    from palettelink.train import data

    items = data.video_frames(Path(video), count=n, span=span)
    if not items:
        raise InvalidRequest(f"{video}: the video will not open or has no frames in that span")
    paths = []
    for item, rgb in zip(items, data.load_all_rgb(items), strict=True):
        p = folder / f"f{item[1]:06d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def _boxes(rec: dict[str, Any]) -> list[scoring.Box]:
    return [scoring.Box(tuple(b["xyxy"]), int(b["class_id"]), float(b["score"])) for b in rec["boxes"]]


def _score(refs: list[list[Any]], preds: list[list[Any]], n_bytes: list[int], conf: float) -> dict[str, Any]:
    ag = scoring.agreement(refs, preds, conf=conf)
    return {"frames": len(n_bytes), "bytes_per_frame": float(np.mean(n_bytes)), "f1": ag.f1,
            "precision": ag.precision, "recall": ag.recall,
            "class_flips": sum(v for (r, p), v in ag.confusion.items() if p not in (r, scoring.MISSED))}


class Server:
    """``palettelink-server`` as a child process on free ports (stopped with SIGTERM)."""

    def __init__(self, bundles: Path) -> None:
        cmd = [sys.executable, "-m", "server.main", "--bundles", str(bundles), "--grpc-port", "0",
               "--http-port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        self.address = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.match(r"^READY grpc=(\S+)", line):
                self.address = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if not self.address:
            self.stop()
            raise InvalidRequest("the server did not get ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(args: argparse.Namespace) -> int:
    from palettelink.models.ultra import SplitDetector

    bundle = find_bundle(args.bundle, args.bundles)
    root = bundle.path.parent.parent
    det = SplitDetector.from_bundle(bundle)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="palettelink-stream-") as tmp:
        frames = extract_frames(args.video, args.span, args.max_frames, Path(tmp))
        rgbs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in frames]
        refs = []
        for rgb in rgbs:
            x, lb = letterbox(rgb, bundle.input_size)
            refs.append(det.detect_image(x, lb, conf=args.conf))
        for q in args.jpeg:
            preds, sizes = [], []
            for rgb in rgbs:
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, int(q)])
                dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                x, lb = letterbox(dec, bundle.input_size)
                preds.append(det.detect_image(x, lb, conf=args.conf))
                sizes.append(len(buf))
            rows.append({"method": "jpeg", "target": f"q{int(q)}", **_score(refs, preds, sizes, args.conf)})
        server = Server(root)
        try:
            for kbps in args.kbps:
                cmd = [sys.executable, "-m", "edge.client", "--server", server.address, "--bundle",
                       f"{bundle.name}/{bundle.version}", "--bundles", str(root), "--codec", args.codec,
                       "--kbps", str(kbps), "--fps", str(args.fps), "--json", tmp]
                run_ = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                      env={**os.environ, "PALETTELINK_TOKEN": ""})
                recs = [json.loads(line) for line in run_.stdout.splitlines() if line.startswith("{")]
                if run_.returncode != 0 or len(recs) != len(frames):
                    raise InvalidRequest(f"edge run at {kbps} kbps failed (exit {run_.returncode}): "
                                         f"{run_.stderr.strip()[-500:]}")
                by_name = {Path(r["source"]).name: r for r in recs}
                ordered = [by_name[p.name] for p in frames]
                levels = [r["level"] for r in ordered]
                rows.append({"method": args.codec, "target": f"{kbps:g} kbps",
                             **_score(refs, [_boxes(r) for r in ordered], [r["bytes"] for r in ordered],
                                      args.conf),
                             "levels": {str(v): levels.count(v) for v in sorted(set(levels))},
                             "kbps_sent": float(np.mean([r["bytes"] for r in ordered])) * 8 * args.fps / 1e3})
        finally:
            server.stop()
    report = {"bundle": bundle.id, "video": args.video, "span": list(args.span), "frames": len(frames),
              "fps": args.fps, "reference": f"unsplit detector on the original frame, conf ≥ {args.conf}",
              "reference_boxes": sum(len(r) for r in refs), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-stream.json").write_text(json.dumps(report, indent=2) + "\n")
    span = f"{args.span[0]:g}–{args.span[1]:g}"
    print(f"{bundle.id}: {len(frames)} frames of {Path(args.video).name} ({span}), "
          f"{report['reference_boxes']} reference boxes, {args.fps:g} fps")
    head = f"{'method':<10} {'target':>10} {'B/frame':>9} {'kbps':>7} {'F1':>5} {'flips':>5}  levels"
    print(head)
    print("-" * len(head))
    for r in rows:
        kb = r.get("kbps_sent", r["bytes_per_frame"] * 8 * args.fps / 1000)
        lv = " ".join(f"{k}:{v}" for k, v in r.get("levels", {}).items())
        print(f"{r['method']:<10} {r['target']:>10} {r['bytes_per_frame']:>9,.0f} {kb:>7.1f} {r['f1']:>5.3f} "
              f"{r['class_flips']:>5}  {lv}")
    print(f"wrote {args.out / 'bench-stream.json'}")
    return 0
