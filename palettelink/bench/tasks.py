"""``palettelink bench-tasks``: every task of an image bundle, per level of each of its codecs, beside
JPEG/WebP/AVIF.

The reference is each task model on the uncompressed original (DESIGN §5: agreement with the
uncompressed pipeline, no labels needed); each row runs the same model on what a codec rebuilt
and scores it. Two kinds of rows:

- the bundle's codecs (``--codecs``, default palette and avif) through the product's own path: the
  edge encoder, the frame's bytes, the server's decoder (palette: the image codec's x̂; avif: the
  picture decoded and letterboxed as the server does), the picture cut out of the letterbox at the
  original size; the AVIF codec's rows are named ``avif-codec``, ``avif`` being the anchor's;
- anchors (``--anchors``): the original picture through Pillow's JPEG/WebP/AVIF, and the honest
  low-rate anchors below the formats' lowest quality, AVIF and JPEG of the picture downscaled by 2
  and 4 then enlarged back (``avif-down2`` … ``jpeg-down4``, :mod:`palettelink.bench.methods`).

Scores:

- detect: box AP50 and AP50:95 against the reference boxes (score ≥ 0.3, what the server reports),
  predictions ranked down to score 0.05 (:mod:`palettelink.scoring`);
- segment: mask IoU, pooled over images (Σ intersection / Σ union);
- landmarks: NME (mean point error / the reference face's inter-ocular distance) of matched faces, and
  the success rate: reference faces found with NME ≤ 0.05;
- pose: mean OKS (COCO sigmas, the reference person's box area as scale) of each reference person's
  best match, and the fraction with OKS ≥ 0.5;
- the picture: PSNR and MS-SSIM of the rebuilt image against the original, at the original size.

``--coco FILE`` scores detection against real labels too (COCO-format annotations whose
``file_name`` matches the benchmarked images; categories matched by name).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import __version__, codecs, scoring
from palettelink.bench.methods import Context, Item, Method, codec_method_name, make_method
from palettelink.bench.task_scores import ADAPTERS, TASKS, picture_quality
from palettelink.bench.tasks_report import best_points, format_table, plot
from palettelink.bundle import Bundle, find_bundle
from palettelink.errors import InvalidRequest
from palettelink.front import Front
from palettelink.image import letterbox
from palettelink.models import family_of, task_model
from palettelink.models.image import rebuilt_image

CODECS = ("palette", "avif")  # the codecs compared by default (those the bundle offers)
ANCHORS = ("jpeg", "webp", "avif", "avif-down2", "avif-down4", "jpeg-down2", "jpeg-down4")
# --------------------------------------------------------------------------------------------------
# runner


def load_coco_labels(path: Path, class_names: Sequence[str]) -> dict[str, list[scoring.Box]]:
    """A COCO-format annotation file → ground-truth boxes by image file name, in the detector's class
    ids (matched by category *name*: COCO's ids have gaps, CenterNet's 0..79 do not). Crowd boxes and
    categories the detector does not know are left out."""
    try:
        coco = json.loads(Path(path).read_text())
        cats = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        files = {int(i["id"]): Path(str(i["file_name"])).name for i in coco["images"]}
        anns = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"--coco {path}: not a COCO-format annotation file ({e})") from e
    index = {n: i for i, n in enumerate(class_names)}
    out: dict[str, list[scoring.Box]] = {f: [] for f in files.values()}
    for a in anns:
        name = cats.get(int(a["category_id"]))
        if a.get("iscrowd") or name not in index or int(a["image_id"]) not in files:
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        out[files[int(a["image_id"])]].append(scoring.Box((x, y, x + w, y + h), index[name]))
    return out


@dataclass
class Row:
    method: str
    point: int
    label: str
    n_bytes: list[int] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)
    preds: dict[str, list[Any]] = field(default_factory=dict)
    psnr: list[float] = field(default_factory=list)
    msssim: list[float] = field(default_factory=list)


def load_task_models(bundle: Bundle, tasks: Sequence[str]) -> dict[str, Any]:
    from palettelink.models import zoo

    out = {}
    for t in tasks:
        tm = task_model(bundle, t)
        if tm is None:
            raise InvalidRequest(f"bundle {bundle.id} has no model for task {t!r}")
        out[t] = zoo.load(tm[0], bundle.file(tm[1]))
    return out


def rebuilt_rgb(bundle: Bundle, item: Item, out: Any) -> np.ndarray:
    if out.rgb is not None:
        return np.asarray(out.rgb)
    return rebuilt_image(out.tensors[0], (item.letterbox.width, item.letterbox.height), bundle.input_size)


def fit(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """``rgb`` shrunk (area filter) so its longer side is at most ``max_side`` (None: as it is)."""
    h, w = rgb.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return rgb
    import cv2

    s = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


class TaskRunner:
    def __init__(self, bundle: Bundle, methods: list[Method], tasks: Sequence[str],
                 max_side: int | None = None) -> None:
        self.bundle, self.methods, self.tasks = bundle, methods, list(tasks)
        self.max_side = max_side
        self.models = load_task_models(bundle, tasks)
        self.refs: dict[str, list[Any]] = {t: [] for t in tasks}
        self.ranked: list[Any] = []
        self.images: list[dict[str, Any]] = []
        self.rows = {(m.name, p): Row(m.name, p, m.label(p)) for m in methods for p in m.points()}
        self.timing: dict[str, list[float]] = {}

    def has_objects(self, item: Any) -> bool:
        """Whether a task model finds a box, a person or a face in the uncompressed picture of a
        :mod:`palettelink.train.data` item (``--objects-only``)."""
        from palettelink.train import data

        rgb = fit(data.load_rgb(item), self.max_side)
        return any(len(ADAPTERS[t].predict(self.models[t], rgb, True))
                   for t in ("detect", "pose", "landmarks") if t in self.tasks)

    def add_image(self, name: str, rgb: np.ndarray, progress: Any = None) -> None:
        x, lb = letterbox(rgb, self.bundle.input_size)
        item = Item(name, rgb, x, lb, [x])
        for t in self.tasks:
            self.refs[t].append(ADAPTERS[t].predict(self.models[t], rgb, True))
        if "detect" in self.tasks:  # the uncompressed pipeline ranked like every row (for --coco)
            self.ranked.append(ADAPTERS["detect"].predict(self.models["detect"], rgb, False))
        self.images.append({"name": name, "width": lb.width, "height": lb.height})
        for m in self.methods:
            for point in m.points():
                out = m.run(item, point)
                im = rebuilt_rgb(self.bundle, item, out)
                row = self.rows[(m.name, point)]
                row.n_bytes.append(out.n_bytes)
                row.pixels.append(item.pixels)
                p, s = picture_quality(im, rgb)
                row.psnr.append(p)
                row.msssim.append(s)
                for t in self.tasks:
                    t0 = time.perf_counter()
                    row.preds.setdefault(t, []).append(ADAPTERS[t].predict(self.models[t], im, False))
                    self.timing.setdefault(t, []).append((time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress.update(1)

    def label_scores(self, labels: dict[str, list[scoring.Box]]) -> dict[str, Any]:
        """Detection AP against real labels, for the uncompressed pipeline and every row, on the
        images the annotation file covers (matched by file name)."""
        keep = [i for i, im in enumerate(self.images) if Path(im["name"]).name in labels]
        if not keep:
            raise InvalidRequest("--coco: none of the benchmarked images is in the annotation file")
        gt = [labels[Path(self.images[i]["name"]).name] for i in keep]

        def ap(preds: list[Any]) -> dict[str, float]:
            res = scoring.evaluate(gt, [preds[i] for i in keep])
            return {"ap50": res.ap50, "ap50_95": res.ap50_95}

        return {"images": len(keep), "boxes": sum(len(g) for g in gt),
                "uncompressed": ap(self.ranked),
                "rows": {f"{r.method} {r.label}": ap(r.preds["detect"]) for r in self.rows.values()}}

    def summary(self, groups: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """One dict per row. ``groups`` (image name → source): each row also scores every source
        apart (``per_source``: bpp and each task's headline score on that source's images)."""
        rows = []
        by: dict[str, list[int]] = {}
        for i, im in enumerate(self.images):
            if groups and im["name"] in groups:
                by.setdefault(groups[im["name"]], []).append(i)
        for r in self.rows.values():
            d: dict[str, Any] = {"method": r.method, "point": r.point, "label": r.label,
                                 "bpp": 8.0 * sum(r.n_bytes) / sum(r.pixels),
                                 "bytes_mean": float(np.mean(r.n_bytes)),
                                 "psnr": float(np.mean(r.psnr)), "msssim": float(np.mean(r.msssim))}
            for t in self.tasks:
                d[t] = ADAPTERS[t].score(self.refs[t], r.preds[t])
            if by:
                d["per_source"] = {}
                for src, idx in sorted(by.items()):
                    bits = 8.0 * sum(r.n_bytes[i] for i in idx)
                    e: dict[str, Any] = {"images": len(idx), "bpp": bits / sum(r.pixels[i] for i in idx)}
                    for t in self.tasks:
                        e[t] = ADAPTERS[t].score([self.refs[t][i] for i in idx], [r.preds[t][i] for i in idx])
                    d["per_source"][src] = e
            rows.append(d)
        return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="vision-image", help="an image bundle (build-bundle --image)")
    p.add_argument("--bundles", help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--codecs", default=None,
                   help=f"the bundle's codecs, through the product's path (default {','.join(CODECS)}: "
                        "those the bundle offers)")
    p.add_argument("--levels", default=None, help="palette levels (default all)")
    p.add_argument("--avif-levels", default=None,
                   help="avif codec levels (default all: 0-5 = q75..q0, 6-9 = the picture at 1/2, 1/4)")
    p.add_argument("--anchors", default=",".join(ANCHORS),
                   help=f"Pillow anchors on the original picture (default {','.join(ANCHORS)})")
    p.add_argument("--qualities", default=None, help="anchor qualities (default each anchor's ladder)")
    p.add_argument("--eval-set", action="store_true",
                   help="the bundle codec's leave-source-out set: every known source its codec never "
                        "trained on (bench/heldout.py, from the bundle's codec/training.json)")
    p.add_argument("--per-source", type=int, default=None, metavar="N",
                   help="with --eval-set: at most N items per source, evenly spread (default all)")
    p.add_argument("--objects-only", action="store_true",
                   help="with --eval-set: only pictures in which an uncompressed task model finds a box, a "
                        "person or a face (chosen on the original picture, before --per-source)")
    p.add_argument("--images", nargs="*", default=[], help="image files/folders/videos")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-side", type=int, default=None, metavar="PX",
                   help="shrink larger pictures (area filter) to this longer side first, as a camera "
                        "stream's frames would be (e.g. 1920; default: as they are)")
    p.add_argument("--coco", type=Path, default=None, metavar="FILE",
                   help="COCO-format annotations: also score detection against these labels (images "
                        "matched by file name)")
    p.add_argument("--out", type=Path, default=Path("bench-out/tasks"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="run nothing: write the markdown of this report beside it (and the README block "
                        "with --readme)")
    p.add_argument("--readme", type=Path, default=None, metavar="FILE",
                   help="regenerate FILE's bench-tasks block (between its markers) from the report")
    p.add_argument("--readme-block", default="lso", metavar="NAME",
                   help="which marked block of --readme (default lso)")


def _images(args: argparse.Namespace, held: Any = None) -> list[tuple[str, np.ndarray]]:
    from palettelink import capture
    from palettelink.image import load_image
    from palettelink.samples import sample_images

    out: list[tuple[str, np.ndarray]] = []
    if held is not None:
        from palettelink.train import data

        items = held.items()
        out += [(data.item_key(i), rgb) for i, rgb in zip(items, data.load_all_rgb(items), strict=True)]
    elif not args.images:
        out += [(p.name, load_image(p)) for p in sample_images()]
    if args.images:
        out += [(c.label, c.rgb) for c in capture.iter_frames(capture.expand(args.images), 1, None)]
    if args.max_images and len(out) > args.max_images:  # spread over every source, not the first ones
        keep = np.unique(np.linspace(0, len(out) - 1, args.max_images).round().astype(int))
        out = [out[int(i)] for i in keep]
    if held is None and not args.images:  # a face (scikit-image's astronaut) beside the samples
        import tempfile

        from palettelink.samples import face_sample

        face = face_sample(Path(tempfile.gettempdir()) / "palettelink-samples")
        if face is not None:
            out.append((face.name, load_image(face)))
    return [(name, fit(rgb, args.max_side)) for name, rgb in out]


def codec_methods(ctx: Context, names: Sequence[str] | None) -> list[Method]:
    """The bundle's codecs as bench methods (edge encoder → bytes → server decoder). ``None``: those
    of :data:`CODECS` the bundle offers. A codec whose name a bench anchor has taken (``avif``, the
    Pillow anchor) is run as ``<name>-codec``."""
    offered = codecs.available(ctx.bundle)
    if names is None:
        names = [c for c in CODECS if c in offered]
    out: list[Method] = []
    for name in names:
        if name not in offered:
            raise InvalidRequest(f"bundle {ctx.bundle.id} has no {name!r} codec; it has {offered}")
        out.append(make_method(codec_method_name(name), ctx))
    return out


def _write_markdown(report: dict[str, Any], md: Path, args: argparse.Namespace) -> None:
    from palettelink.bench import tasks_report

    md.write_text(tasks_report.full_markdown(report))
    print(tasks_report.verdict_text(report))
    print(f"wrote {md}")
    if args.readme is not None:
        changed = tasks_report.sync_readme(args.readme, report, args.readme_block)
        print(f"{args.readme}: block {args.readme_block!r} " + ("regenerated" if changed else "unchanged"))


def render(args: argparse.Namespace) -> int:
    """``--render JSON``: the markdown (and README block) of a committed report; runs nothing."""
    try:
        report = json.loads(args.render.read_text())
        report["rows"], report["tasks"]  # noqa: B018 - a bench-tasks report has both
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"--render {args.render}: not a bench-tasks report ({e})") from e
    _write_markdown(report, args.render.with_suffix(".md"), args)
    return 0


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.render is not None:
        return render(args)
    bundle = find_bundle(args.bundle, args.bundles)
    fam = family_of(bundle)
    if fam != "image":
        raise InvalidRequest(f"bench-tasks scores image bundles; {bundle.id} is of family {fam!r} "
                             "(use `palettelink bench` for split detectors)")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in ADAPTERS]
    if bad:
        raise InvalidRequest(f"unknown task(s) {bad}; known: {list(ADAPTERS)}")
    labels = None
    if args.coco is not None:  # read before any work: a bad file fails at once
        if "detect" not in tasks:
            raise InvalidRequest("--coco scores the detect task; add it to --tasks")
        labels = load_coco_labels(args.coco, bundle.class_names)
    options: dict[str, Any] = {}
    anchors = [a for a in args.anchors.split(",") if a]
    if args.levels:
        options["palette_levels"] = [int(v) for v in args.levels.split(",")]
    if args.avif_levels:
        options["avif_levels"] = [int(v) for v in args.avif_levels.split(",")]
    if args.qualities:
        for name in anchors:
            options[f"{name}_qualities"] = [int(v) for v in args.qualities.split(",")]
    ctx = Context(bundle, Front(bundle), options)
    wanted = None if args.codecs is None else [c for c in args.codecs.split(",") if c]
    methods = [*codec_methods(ctx, wanted), *[make_method(n, ctx) for n in anchors]]
    if not args.eval_set and (args.per_source is not None or args.objects_only):
        raise InvalidRequest("--per-source and --objects-only go with --eval-set")
    if args.max_side is not None and args.max_side < 32:
        raise InvalidRequest("--max-side must be at least 32 pixels")
    runner = TaskRunner(bundle, methods, tasks, args.max_side)
    held = None
    report_set: dict[str, Any] = {}
    if args.eval_set:
        from palettelink.bench.heldout import held_out

        held = held_out(bundle, args.per_source, runner.has_objects if args.objects_only else None)
        report_set.update({"set": "leave-source-out (sources the bundle's codec never trained on)",
                           **held.describe(), "per_source": args.per_source,
                           "objects_only": args.objects_only})
    if args.max_side is not None:
        report_set["max_side"] = args.max_side
    images = _images(args, held)
    t0 = time.perf_counter()
    with tqdm(total=len(images) * sum(len(m.points()) for m in methods), unit="pt",
              disable=args.no_progress) as bar:
        for name, rgb in images:
            runner.add_image(name, rgb, bar)
    groups = None
    if held is not None:
        from palettelink.train import data

        groups = {data.item_key(i): src for src, items in held.sources.items() for i in items}
    rows = runner.summary(groups)
    report = {"palettelink": __version__, "bundle": bundle.id, "tasks": tasks,
              "reference": "each task model on the uncompressed original image",
              "models": {t: task_model(bundle, t)[0] for t in tasks},  # type: ignore[index]
              "images": runner.images, "seconds": round(time.perf_counter() - t0, 1),
              "reference_counts": {t: rows[0][t].get("n_reference") for t in tasks} if rows else {},
              "task_ms": {t: float(np.mean(v)) for t, v in runner.timing.items()},
              "rows": rows, "lowest_bpp_at_0.9": best_points(rows, tasks, 0.9),
              "lowest_bpp_at_0.95": best_points(rows, tasks)}
    report.update(report_set)
    if labels is not None:
        report["labels"] = runner.label_scores(labels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-tasks.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    title = f"{bundle.id}: {len(runner.images)} image(s)"
    plot(rows, tasks, args.out / "tasks.png", title)
    print(title)
    print(format_table(rows, tasks))
    for t, per in report["lowest_bpp_at_0.95"].items():
        print(f"{t}: lowest bpp at ≥ 0.95 of uncompressed: "
              + (", ".join(f"{m} {v['bpp']} ({v['label']})" for m, v in per.items()) or "none"))
    if "labels" in report:
        lab = report["labels"]
        rows_ap = ", ".join(f"{k} {v['ap50']:.3f}" for k, v in lab["rows"].items())
        print(f"against {args.coco} ({lab['images']} images, {lab['boxes']} boxes): uncompressed AP50 "
              f"{lab['uncompressed']['ap50']:.3f}; {rows_ap}")
    print(f"wrote {args.out / 'bench-tasks.json'} and {args.out / 'tasks.png'}")
    _write_markdown(report, args.out / "bench-tasks.md", args)
    return 0
