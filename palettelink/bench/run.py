"""``palettelink bench``: rate–accuracy of feature codecs and image-codec anchors, one table.

Accuracy is agreement with the uncompressed pipeline (DESIGN §5): the reference is the unsplit
detector on the letterboxed original image; every method's decoded output is run through the tail
(features) or the whole detector (images) and scored with COCO-style AP50 and AP50:95. Rate is
bpp = 8·bytes / (W·H of the original image), pooled over the image set (Σ bits / Σ pixels).

Writes ``bench.json``, ``rate_accuracy.png`` and prints the table. Reference detections use the
deployment threshold (``--ref-conf``, 0.25); predictions keep low-score boxes (``--pred-conf``,
0.001) so they can be ranked, as in COCO evaluation; identical outputs then score AP = 1 exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import __version__, benchfile, scoring
from palettelink.bench.ablations import ABLATIONS
from palettelink.bench.methods import METHODS, Context, Item, Method, make_method, prepare
from palettelink.bundle import Bundle, find_bundle
from palettelink.cliutil import ints
from palettelink.errors import InvalidRequest
from palettelink.front import PRECISIONS, Front, GraphChoice, session_defaults, set_session_defaults
from palettelink.image import letterbox, load_image, window_letterbox
from palettelink.models.ultra import postprocess
from palettelink.samples import sample_images

DEFAULT_BUNDLE = "fall-yolov8"
# The server's graphs as the bench runs them: ``fp32`` the float pipeline (fp32 decoder, torch tail),
# ``auto`` what the server runs (:func:`palettelink.models.ultra_ort.choose_server_graph`)
SERVER_PRECISIONS = ("fp32", "auto")


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=DEFAULT_BUNDLE,
                   help=f"bundle name or folder (default {DEFAULT_BUNDLE})")
    p.add_argument("--bundles", type=Path, default=None, metavar="DIR", help="bundle root")
    p.add_argument("--codec", type=_names, default=["baseline"],
                   help="feature codecs, comma-separated (default baseline; palette when the bundle has it)")
    p.add_argument("--anchors", type=_names, default=["jpeg"],
                   help="image codecs to compare with: jpeg, webp, avif (default jpeg; '' for none)")
    p.add_argument("--no-bypass", action="store_true", help="skip the uncompressed-features row")
    p.add_argument("--bits", type=ints, default=None, help="baseline bits to test (default 8..2)")
    p.add_argument("--levels", type=ints, default=None, help="palette levels to test (default all)")
    p.add_argument("--qualities", type=ints, default=None, help="anchor qualities (default per format)")
    p.add_argument("--images", nargs="+", action="extend", default=[], metavar="PATH",
                   help="more images, folders or videos (frames)")
    p.add_argument("--no-samples", action="store_true", help="leave out the bundled sample images")
    p.add_argument("--eval-set", action="store_true",
                   help="the leave-source-out evaluation set: sources no training item comes from "
                        "(palettelink.train.data.eval_sources; docs/EVALUATION.md)")
    p.add_argument("--same-site", action="store_true",
                   help="the same-site set: later frames of training videos (memory, reported apart)")
    p.add_argument("--source", default=None, metavar="TEXT",
                   help="with --eval-set/--same-site: only the sources whose name contains TEXT "
                        "(e.g. vtest.avi: the held-out camera, for site adaptation)")
    p.add_argument("--train-set", type=int, default=0, metavar="N",
                   help="N training images (spread over the sorted training set): shows under-fitting")
    p.add_argument("--ablations", type=_names, default=[],
                   help="ablation rows, comma-separated or 'all': " + ", ".join(ABLATIONS))
    p.add_argument("--assets", type=Path, default=None, help="trained codec assets (for ablations)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th video frame")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="cap on --images frames")
    p.add_argument("--canvas", choices=("square", "window"), default="square",
                   help="palette codec: code the whole letterbox (default, the committed results) or the "
                        "frame's window of it, as an edge does with a server that decodes windows")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="edge graphs (front, palette encoder): fp32 (default: the codec measured against the "
                        "float pipeline), int8, or auto (what the edge runs: int8 where the bundle measured "
                        "it agreeing); the report names the graphs")
    p.add_argument("--server-precision", choices=SERVER_PRECISIONS, default="fp32",
                   help="server graphs (feature decoder, detector tail): fp32 (default: the fp32 decoder and "
                        "the torch tail, the float pipeline) or auto (what the server runs: its onnxruntime "
                        "path, with the int8 decoder and tail where the bundle kept them); with --precision "
                        "auto and --canvas window, the product's default configuration end to end")
    p.add_argument("--ref-conf", type=float, default=0.25, help="score threshold of the reference")
    p.add_argument("--pred-conf", type=float, default=0.001, help="score threshold of predictions")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out/)")
    p.add_argument("--compare-with", type=Path, default=None, metavar="BENCH_JSON",
                   help="another run's bench.json on the same images (e.g. the generic bundle, to measure "
                        "an adapted one): BD-rate of each method common to both")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class Row:
    """Accumulates one (method, rate point) over the image set."""

    method: str
    kind: str
    point: int
    label: str
    n_bytes: list[int] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)
    detections: list[list[Any]] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def add(self, n_bytes: int, pixels: int, dets: list[Any], timings: dict[str, float]) -> None:
        self.n_bytes.append(n_bytes)
        self.pixels.append(pixels)
        self.detections.append(dets)
        for k, v in timings.items():
            self.timings.setdefault(k, []).append(v)

    def summary(self, references: list[list[Any]], class_names: list[str], conf: float = 0.25
                ) -> dict[str, Any]:
        ap = scoring.evaluate(references, self.detections)
        ag = scoring.agreement(references, self.detections, conf=conf)

        def name(c: int) -> str:
            return "missed" if c == scoring.MISSED else class_names[c] if c < len(class_names) else str(c)

        return {
            "method": self.method, "kind": self.kind, "point": self.point, "label": self.label,
            "bytes_mean": float(np.mean(self.n_bytes)),
            "bpp": 8.0 * sum(self.n_bytes) / sum(self.pixels),
            "bpp_per_image": [8.0 * b / p for b, p in zip(self.n_bytes, self.pixels, strict=True)],
            "ap50": ap.ap50, "ap50_95": ap.ap50_95, "n_predicted": ap.n_predicted,
            "ap50_per_class": {name(c): v for c, v in zip(ap.classes, ap.ap50_per_class, strict=True)},
            "f1": ag.f1, "precision": ag.precision, "recall": ag.recall,
            "recall_by_size": ag.recall_by_size, "n_by_size": ag.n_by_size,
            "confusion": {f"{name(r)}->{name(p)}": n for (r, p), n in sorted(ag.confusion.items())},
            "class_flips": sum(n for (r, p), n in ag.confusion.items() if p not in (r, scoring.MISSED)),
            "missed": sum(n for (_, p), n in ag.confusion.items() if p == scoring.MISSED),
            "extra": ag.n_extra,
            **{k: float(np.mean(v)) for k, v in sorted(self.timings.items())},
        }


def iter_images(args: argparse.Namespace) -> Iterator[tuple[str, np.ndarray]]:
    """(name, RGB) for the samples and every ``--images`` input. Reuses the capture module the edge uses,
    so the benchmark reads folders and videos exactly as the client does."""
    if getattr(args, "eval_set", False) or getattr(args, "same_site", False):
        from palettelink.train import data

        for item, rgb in zip(*_loaded(_set_items(args)), strict=True):
            yield data.item_key(item), rgb
    elif getattr(args, "train_set", 0):
        from palettelink.train import data

        for item, rgb in zip(*_loaded(data.training_images(max_images=args.train_set)), strict=True):
            yield data.item_key(item), rgb
    elif not args.no_samples:
        for p in sample_images():
            yield p.name, load_image(p)
    if args.images:
        from palettelink import capture

        for cap in capture.iter_frames(capture.expand(args.images), args.every, args.max_frames):
            yield cap.label, cap.rgb


def _set_sources(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The built-in set asked for (--eval-set or --same-site), by source, filtered by --source."""
    from palettelink.train import data

    src = data.eval_sources() if getattr(args, "eval_set", False) else data.same_site_sources()
    want = getattr(args, "source", None)
    if want:
        src = {k: v for k, v in src.items() if want in k}
        if not src:
            raise InvalidRequest(f"--source {want!r} matches no source of the set")
    return src


def _set_items(args: argparse.Namespace) -> list[Any]:
    from palettelink.train import data

    return sorted((i for v in _set_sources(args).values() for i in v), key=data.item_key)


def _source_names(args: argparse.Namespace) -> dict[str, str] | None:
    """Image name → source for the built-in sets (per-source rows); None for user images."""
    if not (getattr(args, "eval_set", False) or getattr(args, "same_site", False)):
        return None
    from palettelink.train import data

    return {data.item_key(i): name for name, items in _set_sources(args).items() for i in items}


def _loaded(items: list[Any]) -> tuple[list[Any], list[np.ndarray]]:
    from palettelink.train import data

    return items, data.load_all_rgb(items)


class Runner:
    """Holds the detector and methods; :meth:`add_image` scores one image at every rate point."""

    def __init__(self, bundle: Bundle, methods: list[Method], ref_conf: float, pred_conf: float,
                 front: Front, detector: Any = None, tail: Any = None) -> None:
        """``tail``: an :class:`~palettelink.models.ultra_ort.OrtTail` (the server's onnxruntime tail)
        that feature outputs go through instead of the torch tail; image anchors always run the unsplit
        torch detector, like the reference."""
        from palettelink.models.ultra import SplitDetector

        self.bundle = bundle
        self.det = detector if detector is not None else SplitDetector.from_bundle(bundle)
        self.tail = tail
        self.front = front
        self.methods = methods
        self.ref_conf, self.pred_conf = ref_conf, pred_conf
        self.references: list[list[Any]] = []
        self.images: list[dict[str, Any]] = []
        self.rows = {(m.name, p): Row(m.name, m.kind, p, m.label(p)) for m in methods for p in m.points()}

    def add_image(self, name: str, rgb: np.ndarray, progress: Any = None) -> None:
        item: Item = prepare(name, rgb, self.front)
        ref = self.det.detect_image(item.x, item.letterbox, conf=self.ref_conf)
        self.references.append(ref)
        self.images.append({"name": name, "width": item.letterbox.width, "height": item.letterbox.height,
                            "reference_boxes": len(ref)})
        for m in self.methods:
            for point in m.points():
                out = m.run(item, point)
                t0 = time.perf_counter()
                if out.tensors is not None:
                    lb = window_letterbox(item.letterbox, out.window)
                    if self.tail is not None:
                        dets = postprocess(self.tail.run(out.tensors), lb, conf=self.pred_conf)
                    else:
                        dets = self.det.detect_tensors(out.tensors, lb, conf=self.pred_conf)
                else:
                    assert out.rgb is not None
                    x, lb = letterbox(out.rgb, self.bundle.input_size)
                    dets = self.det.detect_image(x, lb, conf=self.pred_conf)
                timings = dict(out.timings_ms, task_ms=(time.perf_counter() - t0) * 1e3)
                self.rows[(m.name, point)].add(out.n_bytes, item.pixels, dets, timings)
                if progress is not None:
                    progress.update(1)

    def summary(self, sources: dict[str, str] | None = None, worst: int = 5) -> list[dict[str, Any]]:
        """One dict per (method, point). With ``sources`` (image name → source), each also gets
        ``per_source`` (AP50, bpp, false boxes per image, misses of that source's images); every row
        gets ``extra_per_image``, its ``worst`` images by misses + false boxes and ``ap50_ci95``, the
        95 % bootstrap interval of its AP50 over the images (resampled within each source): on 85
        pictures two boxes move AP50 by about 0.004, and a line such as 0.95 is read against that."""
        names = list(self.det.class_names)
        out = []
        by_source: dict[str, list[int]] = {}
        strata = [(sources or {}).get(im["name"], "other") for im in self.images]
        for i, source in enumerate(strata):
            by_source.setdefault(source, []).append(i)
        for row in self.rows.values():
            r = row.summary(self.references, names, self.ref_conf)
            r["extra_per_image"] = r["extra"] / max(1, len(self.images))
            boot = scoring.bootstrap_ap50(self.references, [row.detections], resamples=AP50_RESAMPLES,
                                          strata=strata)
            r["ap50_ci95"] = list(boot.interval[0])
            per_image = []
            for i, im in enumerate(self.images):
                ag = scoring.agreement([self.references[i]], [row.detections[i]], conf=self.ref_conf)
                missed = sum(n for (_, p), n in ag.confusion.items() if p == scoring.MISSED)
                per_image.append({"name": im["name"], "reference_boxes": im["reference_boxes"],
                                  "missed": missed, "extra": ag.n_extra,
                                  "bpp": 8.0 * row.n_bytes[i] / row.pixels[i]})
            r["worst_images"] = sorted(per_image, key=lambda d: -(d["missed"] + d["extra"]))[:worst]
            if sources:
                r["per_source"] = {}
                for src, idx in sorted(by_source.items()):
                    ap = scoring.evaluate([self.references[i] for i in idx],
                                          [row.detections[i] for i in idx])
                    n_ref = sum(self.images[i]["reference_boxes"] for i in idx)
                    bits = 8.0 * sum(row.n_bytes[i] for i in idx)
                    r["per_source"][src] = {
                        "images": len(idx), "reference_boxes": n_ref, "ap50": ap.ap50,
                        "bpp": bits / sum(row.pixels[i] for i in idx),
                        "extra_per_image": sum(per_image[i]["extra"] for i in idx) / len(idx),
                        "missed": sum(per_image[i]["missed"] for i in idx)}
            out.append(r)
        return out


def _curve(rows: list[dict[str, Any]], method: str, key: str) -> tuple[list[float], list[float]]:
    """(bpp, accuracy) points of ``method`` in ``rows``, NaN accuracies left out."""
    pts = [(r["bpp"], r[key]) for r in rows if r["method"] == method and r[key] == r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


def bd_rates_between(rows: list[dict[str, Any]], other: list[dict[str, Any]],
                     key: str = "ap50") -> dict[str, float | None]:
    """BD-rate (%) of each method of ``rows`` against the same method in ``other`` (another run)."""
    from palettelink.bench.bdrate import bd_rate

    common = [m for m in dict.fromkeys(r["method"] for r in rows) if any(o["method"] == m for o in other)]
    return {m: bd_rate(*_curve(other, m, key), *_curve(rows, m, key)) for m in common
            if len(_curve(rows, m, key)[0]) >= 2}


def bd_rates(rows: list[dict[str, Any]], anchor: str = "jpeg", key: str = "ap50") -> dict[str, float | None]:
    """BD-rate (%) of every other multi-point method against ``anchor`` at equal ``key`` accuracy
    (``palettelink.bench.bdrate``; None where the curves share no accuracy range)."""
    from palettelink.bench.bdrate import bd_rate

    def curve(method: str) -> tuple[list[float], list[float]]:
        return _curve(rows, method, key)

    methods = list(dict.fromkeys(r["method"] for r in rows))
    if anchor not in methods:
        return {}
    ar, aq = curve(anchor)
    return {m: bd_rate(ar, aq, *curve(m)) for m in methods if m != anchor and len(curve(m)[0]) >= 2}


AP50_RESAMPLES = 1000  # bootstrap draws per row: about half a second each on this set


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<16} {'point':>6} {'bytes/img':>11} {'bpp':>8} {'AP50':>6} {'AP50:95':>7} " \
           f"{'enc ms':>7} {'dec ms':>7} {'task ms':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<16} {r['label']:>6} {r['bytes_mean']:>11,.0f} {r['bpp']:>8.3f} "
            f"{r['ap50']:>6.3f} {r['ap50_95']:>7.3f} {r.get('encode_ms', 0.0):>7.1f} "
            f"{r.get('decode_ms', 0.0):>7.1f} {r.get('task_ms', 0.0):>7.1f}")
    return "\n".join(lines)


def format_agreement(rows: list[dict[str, Any]], conf: float) -> str:
    """Second table: what a deployment sees at its threshold (per size bucket and class flips)."""
    def pct(v: float) -> str:
        return "   -" if v != v else f"{v:4.2f}"

    head = (f"{'method':<16} {'point':>6} {'F1':>5} {'small':>5} {'medium':>6} {'large':>5} "
            f"{'flips':>5} {'missed':>6} {'extra':>5}  per-class AP50")
    lines = [f"at score ≥ {conf}: same-class recall per COCO size bucket, class flips, misses, extras",
             head, "-" * len(head)]
    for r in rows:
        rs = r["recall_by_size"]
        per_class = " ".join(f"{k} {v:.2f}" for k, v in r["ap50_per_class"].items())
        lines.append(f"{r['method']:<16} {r['label']:>6} {pct(r['f1']):>5} {pct(rs['small']):>5} "
                     f"{pct(rs['medium']):>6} {pct(rs['large']):>5} {r['class_flips']:>5} {r['missed']:>6} "
                     f"{r['extra']:>5}  {per_class}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what the README's Metrics section is regenerated from)."""
    rows = report["rows"]

    def f(v: float) -> str:
        return "–" if v != v else f"{v:.2f}"

    head = []
    if report.get("set"):
        sources = ", ".join(f"{k} ({v})" for k, v in report["sources"].items())
        head = [f"Set: **{report['set']}** ({len(report['images'])} images, {report['reference_boxes']} "
                f"reference boxes). Sources: {sources}", ""]
    if report.get("edge_graphs"):
        graphs = ", ".join(f"{g} → {c['file']} ({c['reason']})" for g, c in report["edge_graphs"].items())
        head += [f"Edge graphs (--precision {report.get('precision', 'auto')}): {graphs}", ""]
    if report.get("server_graphs"):
        graphs = ", ".join(f"{g} → {c['file']} ({c['precision']})"
                           for g, c in report["server_graphs"].items())
        head += [f"Server graphs (--server-precision {report.get('server_precision', 'fp32')}): {graphs}", ""]
    if report.get("canvas") == "window":
        head += ["Palette canvas: the frame's window of the letterbox (`--canvas window`), decoded as it is",
                 ""]
    out = head + ["| method | point | bytes/image | bpp | AP50 | AP50 95 % interval | AP50:95 | F1 | small "
                  "| medium | large | flips | missed | false boxes/image | per-class AP50 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rs = r["recall_by_size"]
        pc = ", ".join(f"{k} {v:.2f}" for k, v in r["ap50_per_class"].items())
        lo, hi = r.get("ap50_ci95", (math.nan, math.nan))
        ci = "–" if lo != lo else f"{lo:.3f}–{hi:.3f}"
        out.append(f"| {r['method']} | {r['label']} | {r['bytes_mean']:,.0f} | {r['bpp']:.3f} | "
                   f"{r['ap50']:.3f} | {ci} | {r['ap50_95']:.3f} | {f(r['f1'])} | {f(rs['small'])} | "
                   f"{f(rs['medium'])} | {f(rs['large'])} | {r['class_flips']} | {r.get('missed', 0)} | "
                   f"{r.get('extra_per_image', float('nan')):.2f} | {pc} |")
    out += ["", "AP50 95 % interval: percentile bootstrap over the images, resampled within each source "
            f"({AP50_RESAMPLES} draws). Frames of one video are not independent pictures, so read it as a "
            "floor on how much another set of pictures would move the figure.", ""]
    srcs = sorted({s for r in rows for s in r.get("per_source", {})})
    if srcs:
        out += ["Per source: AP50 (bpp; false boxes per image)", "",
                "| method | point | " + " | ".join(srcs) + " |", "|---|---|" + "---:|" * len(srcs)]
        for r in rows:
            ps = r["per_source"]
            cells = [f"{f(ps[x]['ap50'])} ({ps[x]['bpp']:.3f}; {ps[x]['extra_per_image']:.1f})" for x in srcs]
            out.append(f"| {r['method']} | {r['label']} | " + " | ".join(cells) + " |")
        out.append("")
        out += ["Worst images per row (misses + false boxes at the reference threshold)", ""]
        for r in rows:
            w = ", ".join(f"{Path(d['name']).name} {d['missed']}m/{d['extra']}f"
                          for d in r["worst_images"][:3])
            out.append(f"- {r['method']} {r['label']}: {w}")
        out.append("")
    for anchor in ("jpeg", "avif"):
        for method, pct in report.get(f"bd_rate_ap50_vs_{anchor}_percent", {}).items():
            out.append(f"- BD-rate vs {anchor} at equal AP50, {method}: "
                       + ("no common AP50 range" if pct is None else f"{pct:+.1f} %"))
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    markers = "osD^v<>ph*"
    for key, ax, name in (("ap50", axes[0], "AP50"), ("ap50_95", axes[1], "AP50:95")):
        for k, method in enumerate(methods):  # one distinct colour (and marker) per method
            pts = sorted((r["bpp"], r[key], r["label"]) for r in rows if r["method"] == method)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker=markers[k % len(markers)], color=cmap(k % cmap.N), label=method)
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("bpp (8·bytes / original W·H)")
        ax.set_ylabel(f"{name} vs uncompressed")
        finite = [r[key] for r in rows if r[key] == r[key]]  # NaN-free
        ax.set_ylim(max(0.0, min(finite, default=0.0) - 0.05) - 0.02, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.eval_set or args.same_site:
        _set_sources(args)  # a --source matching nothing fails before any work
    if args.images:
        from palettelink import capture

        capture.expand(args.images)  # a bad --images path fails before any work, not after the samples
    bundle = find_bundle(args.bundle, args.bundles)
    options = {"baseline_levels": args.bits, "palette_levels": args.levels, "assets": args.assets,
               "canvas": args.canvas, "server_precision": args.server_precision}
    ablations = list(ABLATIONS) if args.ablations == ["all"] else list(args.ablations)
    for fmt in ("jpeg", "webp", "avif"):
        options[f"{fmt}_qualities"] = args.qualities
    saved = session_defaults()
    set_session_defaults(**{**saved, "precision": args.precision})
    try:
        return _run_bench(args, bundle, options, ablations)
    finally:
        set_session_defaults(**saved)


def _edge_graphs(front: Front, methods: list[Method]) -> dict[str, dict[str, str]]:
    """Which file ran each edge graph of this bench and why (an int8 front moves every row): the
    choices the front and each codec's encoder made when they opened their sessions."""
    choices = {"front.onnx": front.graph}
    for m in methods:
        graph = getattr(getattr(m, "encoder", None), "graph", None)
        if isinstance(graph, GraphChoice):
            choices[m.name] = graph
    return {k: _graph_entry(c) for k, c in choices.items()}


def _graph_entry(choice: GraphChoice) -> dict[str, str]:
    """How the report names one graph that ran: its file, precision and why."""
    return {"file": choice.file, "precision": choice.precision, "reason": choice.reason}


def server_tail(bundle: Bundle, precision: str) -> Any:
    """The server's onnxruntime tail where ``precision`` is ``auto`` and the server runs one for this
    bundle (:func:`palettelink.models.ultra_ort.uses_onnxruntime`), else None (the torch tail)."""
    from palettelink.models.ultra_ort import OrtTail, uses_onnxruntime

    if precision not in SERVER_PRECISIONS:
        raise InvalidRequest(f"server precision must be one of {SERVER_PRECISIONS}, got {precision!r}")
    return OrtTail(bundle) if precision == "auto" and uses_onnxruntime(bundle) else None


def _server_graphs(methods: list[Method], tail: Any) -> dict[str, dict[str, str]]:
    """Which file ran each server graph of this bench: each codec's decoder network, then the tail."""
    out = {}
    for m in methods:
        graph = getattr(m, "server_graph", lambda: None)()
        if isinstance(graph, GraphChoice):
            out[f"{m.name} decoder"] = _graph_entry(graph)
    out["tail"] = (_graph_entry(tail.graph) if tail is not None
                   else {"file": "torch", "precision": "fp32", "reason": "the float pipeline"})
    return out


def _run_bench(args: argparse.Namespace, bundle: Bundle, options: dict[str, Any],
               ablations: list[str]) -> int:
    from tqdm import tqdm

    front = Front(bundle)
    ctx = Context(bundle, front, options)
    names = ([] if args.no_bypass else ["bypass"]) + list(args.codec) + ablations + list(args.anchors)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InvalidRequest(f"unknown method(s) {unknown}; known: {', '.join(sorted(METHODS))}")
    methods = [make_method(n, ctx) for n in names]
    tail = server_tail(bundle, args.server_precision)
    runner = Runner(bundle, methods, args.ref_conf, args.pred_conf, front, tail=tail)
    per_image = sum(len(m.points()) for m in methods)
    t_start = time.perf_counter()
    images = tqdm(iter_images(args), desc="images", unit="img", disable=args.no_progress)
    with tqdm(desc="rate points", unit="pt", disable=args.no_progress, leave=False) as points:
        for name, rgb in images:
            points.total = (points.total or 0) + per_image
            runner.add_image(name, rgb, points)
    if not runner.images:
        raise InvalidRequest("no images to benchmark (--no-samples without --images?)")
    sources = _source_names(args)
    rows = runner.summary(sources)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "palettelink": __version__, "bundle": bundle.id, "table_hash": bundle.table_hash_hex,
        "reference": f"unsplit detector on the letterboxed original, conf ≥ {args.ref_conf}",
        "pred_conf": args.pred_conf, "precision": args.precision, "canvas": args.canvas,
        "edge_graphs": _edge_graphs(front, methods),
        "server_precision": args.server_precision, "server_graphs": _server_graphs(methods, tail),
        "metric": "COCO AP (101-point, class-aware) vs reference boxes",
        "bpp": "8*sum(bytes)/sum(W*H of the original images)",
        "images": runner.images, "reference_boxes": sum(i["reference_boxes"] for i in runner.images),
        "seconds": round(time.perf_counter() - t_start, 1), "rows": rows,
        "bd_rate_ap50_vs_jpeg_percent": bd_rates(rows),
        "bd_rate_ap50_vs_avif_percent": bd_rates(rows, "avif"),
    }
    if args.compare_with is not None:
        try:
            other = benchfile.read(args.compare_with)
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"--compare-with {args.compare_with}: not a readable bench.json "
                                 f"({e})") from e
        if [i["name"] for i in other.get("images", [])] != [i["name"] for i in runner.images]:
            raise InvalidRequest(f"--compare-with {args.compare_with}: it was measured on other images")
        report["compared_with"] = {"bundle": other.get("bundle"), "table_hash": other.get("table_hash")}
        report["bd_rate_ap50_vs_compared_percent"] = bd_rates_between(rows, other["rows"])
    if args.eval_set or args.train_set or args.same_site:
        from palettelink.train import data

        report["set"] = ("leave-source-out" if args.eval_set else "same site" if args.same_site
                         else "training images")
        report["sources"] = (data.describe_sources(_set_items(args)) if args.eval_set or args.same_site
                             else data.describe_sources(data.training_images(max_images=args.train_set)))
    assets = args.assets or Path("assets/codecs") / bundle.name
    if (assets / "training.json").is_file():
        report["training_images"] = json.loads((assets / "training.json").read_text()).get("train_images")
    out_json = benchfile.write(args.out / benchfile.FILE_NAME, report)
    (args.out / "bench.md").write_text(markdown(report))
    n_ref = report["reference_boxes"]
    title = f"{bundle.id}: {len(runner.images)} image(s), {n_ref} reference boxes"
    plot(rows, args.out / "rate_accuracy.png", title)
    print(title)
    print(format_table(rows))
    print()
    print(format_agreement(rows, args.ref_conf))
    for anchor in ("jpeg", "avif"):
        for method, pct in report[f"bd_rate_ap50_vs_{anchor}_percent"].items():
            print(f"BD-rate vs {anchor} at equal AP50, {method}: "
                  + ("no common AP50 range" if pct is None else f"{pct:+.1f} %"))
    for method, pct in report.get("bd_rate_ap50_vs_compared_percent", {}).items():
        print(f"BD-rate vs {report['compared_with']['bundle']} at equal AP50, {method}: "
              + ("no common AP50 range" if pct is None else f"{pct:+.1f} %"))
    if n_ref < 100:
        print(f"note: only {n_ref} reference boxes; AP differences of a few points are noise "
              "(add --images with more pictures or video frames)")
    print(f"wrote {out_json}, {args.out / 'bench.md'} and {args.out / 'rate_accuracy.png'}")
    return 0

