"""Offline, unlabelled image sources for codec training, and a disk cache of crossing tensors.

DESIGN §6: no datasets can be downloaded, so training uses what the machine already holds. TRAIN and
EVAL are kept apart *by source* (not by random split), so evaluation never sees frames of a video or
photos of a collection that training saw:

- TRAIN: photos in opencv-doc's ``examples/data`` (minus a small deny list of charts, text and
  calibration patterns), every Nth frame of ``Megamind.avi`` and ``tree.avi``, GNOME raster
  backgrounds, and ``sklearn.datasets.load_sample_images``.
- EVAL: ultralytics' ``bus.jpg`` and ``zidane.jpg`` plus 40 frames spread over ``vtest.avi``
  (walking pedestrians: ≥ 100 teacher boxes, enough for a meaningful AP50).

An *item* is a path or a ``(video path, frame index)`` pair; lists are sorted so they are stable.

:class:`CrossingCache` runs the frozen front once per (item, augmentation variant) and keeps the
crossing tensors as fp16 memmaps, so training epochs never re-run the front.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import cv2
import numpy as np

from palettelink.image import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Letterbox, letterbox, letterbox_info, load_image

if TYPE_CHECKING:
    import torch

Item = Union[Path, tuple[Path, int]]  # noqa: UP007 (runtime alias)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
GNOME_BACKGROUNDS = Path("/usr/share/backgrounds/gnome")
# Charts, text, calibration boards, logos and masks: no natural image statistics to learn from.
DENY = ("left", "right", "chessboard", "digits", "sudoku", "text", "imagetext", "alphabet", "notes",
        "gradient", "mask", "logo", "pic", "ellipses", "detect_blob", "ml.png", "templ", "tmpl",
        "cards", "aloegt", "pca_test", "board", "box")
TRAIN_VIDEOS = (("Megamind.avi", 6), ("tree.avi", 3))  # (file, every Nth frame)
EVAL_VIDEO = "vtest.avi"
EVAL_VIDEO_FRAMES = 40


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


def _video_frames(path: Path, every: int | None = None, count: int | None = None) -> list[Item]:
    n = video_length(path)
    if n <= 0:
        return []
    if count is not None:
        idx = sorted({int(i) for i in np.linspace(0, n - 1, count)})
    else:
        idx = list(range(0, n, every or 1))
    return [(path, i) for i in idx]


def _sklearn_images() -> list[Item]:
    try:
        from sklearn.datasets import load_sample_images

        return sorted(Path(f) for f in load_sample_images().filenames)
    except Exception:  # noqa: BLE001 - optional source
        return []


def _ultralytics_assets() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "assets"


def _user_source(p: Path, every: int = 10) -> list[Item]:
    """A user folder (images and videos inside, recursively), image file or video file."""
    if p.is_dir():
        out: list[Item] = []
        for q in sorted(p.rglob("*")):
            out += _user_source(q, every) if q.is_file() else []
        return out
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return [p]
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return _video_frames(p, every=every)
    return []


def training_sources(root: Path = OPENCV_DATA, backgrounds: Path = GNOME_BACKGROUNDS,
                     extra: Sequence[str | os.PathLike[str]] = ()) -> dict[str, list[Item]]:
    """TRAIN items grouped by source name (for reports). ``extra``: more folders/images/videos."""
    src: dict[str, list[Item]] = {}
    if root.is_dir():
        src["opencv-doc photos"] = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                                          and not _denied(p.name))
        for name, every in TRAIN_VIDEOS:
            if (root / name).is_file():
                src[f"{name} (every {every} frames)"] = _video_frames(root / name, every=every)
    if backgrounds.is_dir():
        src["gnome-backgrounds"] = sorted(p for p in backgrounds.iterdir()
                                          if p.suffix.lower() in IMAGE_SUFFIXES)
    skl = _sklearn_images()
    if skl:
        src["sklearn sample images"] = skl
    for e in extra:
        src[f"user: {e}"] = _user_source(Path(e))
    return {k: v for k, v in src.items() if v}


def eval_sources(root: Path = OPENCV_DATA, frames: int = EVAL_VIDEO_FRAMES) -> dict[str, list[Item]]:
    """EVAL items grouped by source: ultralytics bus/zidane + ``frames`` frames of vtest.avi."""
    src: dict[str, list[Item]] = {}
    assets = _ultralytics_assets()
    if assets is not None:
        src["ultralytics assets"] = sorted(p for p in (assets / "bus.jpg", assets / "zidane.jpg")
                                           if p.is_file())
    if (root / EVAL_VIDEO).is_file():
        src[f"{EVAL_VIDEO} ({frames} frames spread over the video)"] = _video_frames(root / EVAL_VIDEO,
                                                                                   count=frames)
    return {k: v for k, v in src.items() if v}


def _flatten(src: dict[str, list[Item]]) -> list[Item]:
    return sorted((i for v in src.values() for i in v), key=item_key)


def training_images(images: Sequence[str | os.PathLike[str]] | None = None, max_images: int | None = None,
                    extra: Sequence[str | os.PathLike[str]] = ()) -> list[Item]:
    """Every TRAIN item, sorted (stable across runs and machines with the same packages).

    ``images`` (folders, image files, videos) replaces the offline sources; ``extra`` adds to them;
    ``max_images`` keeps that many, evenly spread over the sorted list.
    """
    if images:
        src = {f"user: {e}": _user_source(Path(e)) for e in [*images, *extra]}
    else:
        src = training_sources(extra=extra)
    items = _flatten(src)
    if max_images is not None and len(items) > max_images:
        items = [items[int(i)] for i in np.linspace(0, len(items) - 1, max(1, max_images)).round()]
    return items


def eval_images(frames: int = EVAL_VIDEO_FRAMES) -> list[Item]:
    """Every EVAL item, sorted; disjoint by source from :func:`training_images`."""
    return _flatten(eval_sources(frames=frames))


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


def describe_sources(items: Sequence[Item] | None = None) -> dict[str, int]:
    """Item counts by source, for reports (JSON-ready).

    Without ``items``: both default sets, keys prefixed "TRAIN: " / "EVAL: ". With ``items``: the
    sources those items come from (an item of no known source counts under its folder).
    """
    if items is None:
        out = {f"TRAIN: {k}": len(v) for k, v in training_sources().items()}
        out.update({f"EVAL: {k}": len(v) for k, v in eval_sources().items()})
        return out
    owner = {item_key(i): k for src in (training_sources(), eval_sources())
             for k, v in src.items() for i in v}
    counts: dict[str, int] = {}
    for i in items:
        k = owner.get(item_key(i)) or f"user: {(i[0] if isinstance(i, tuple) else i).parent}"
        counts[k] = counts.get(k, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------
# augmentation + crossing-tensor cache


def augmented_input(rgb: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray,
                                                                                          Letterbox]:
    """Letterbox ``rgb`` to ``size``²; with ``rng``, a random zoom (0.6–1.6×), crop and h-flip first.

    Variant 0 of every item is the plain letterbox (``rng`` None), the view the codec sees at run time.
    """
    if rng is None:
        return letterbox(rgb, size)
    h, w = rgb.shape[:2]
    zoom = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if zoom > 1.0:  # crop a window 1/zoom of the image, at a random place
        cw, ch = max(16, round(w / zoom)), max(16, round(h / zoom))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        rgb = rgb[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    rgb = np.ascontiguousarray(rgb)
    if zoom >= 1.0:
        return letterbox(rgb, size)
    # zoom out: shrink the image inside the square canvas at a random place (more small objects)
    info = letterbox_info(rgb.shape[1], rgb.shape[0], size)
    nw, nh = max(8, round(rgb.shape[1] * info.scale * zoom)), max(8, round(rgb.shape[0] * info.scale * zoom))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    px, py = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    canvas[py:py + nh, px:px + nw] = small
    x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(x), Letterbox(info.scale * zoom, px, py, rgb.shape[1], rgb.shape[0])


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

    ``augment`` = number of extra random variants per item (variant 0 is always the plain letterbox).
    Variants are drawn from ``np.random.default_rng((seed, item index, variant))``, so a cache is
    reproducible. A cache folder is reused when its meta (items, size, augment, seed, front) matches,
    and a partly filled one resumes where it stopped.
    """

    def __init__(self, det: Any, items: Sequence[Item], size: int | str | os.PathLike[str] = 640,
                 augment: int = 0, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if not isinstance(size, int):  # called as CrossingCache(det, items, cache_dir, ...)
            size, cache_dir = 640, size
        self.det = det
        self.items = list(items)
        self.size = int(size)
        self.augment = int(augment)
        self.seed = int(seed)
        self.entries = [CacheEntry(it, v) for it in self.items for v in range(self.augment + 1)]
        self.shapes: list[tuple[int, int, int]] = self._shapes()
        meta = {"items": [item_key(i) for i in self.items], "size": self.size, "augment": self.augment,
                "seed": self.seed, "front": _weights_tag(det), "shapes": self.shapes}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir else default_cache_dir() / "crossing"
        self.dir = base / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1))
        n = len(self.entries)
        self.arrays = [self._memmap(f"t{k}.f16", (n, *s)) for k, s in enumerate(self.shapes)]
        self._done = self._memmap_u8("done.u8", n)
        self.letterboxes: list[Letterbox | None] = [None] * n
        self._fill(progress)

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
        return augmented_input(rgb, self.size, rng)

    def _fill(self, progress: bool) -> None:
        import torch
        from tqdm import tqdm

        todo = [i for i in range(len(self.entries)) if not self._done[i]]
        bar = tqdm(todo, desc="front → cache", unit="img", disable=not progress or not todo)
        rgb, loaded = None, -1
        with torch.inference_mode():
            for i in bar:
                item_idx = i // (self.augment + 1)
                if item_idx != loaded:  # decode each image once for all its variants
                    rgb, loaded = load_rgb(self.entries[i].item), item_idx
                x, info = self.input_of(i, rgb)
                outs = self.det.front(torch.from_numpy(x).to(self.det.device))
                for arr, t in zip(self.arrays, outs, strict=True):
                    arr[i] = t[0].float().cpu().numpy().astype(np.float16)
                self.letterboxes[i] = info
                self._done[i] = 1
                if len(todo) > 8 and bar.n % 32 == 0:
                    self.flush()
        self.flush()

    def flush(self) -> None:
        for a in self.arrays:
            a.flush()
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

    def random_offsets(self, n: int, crop: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``n`` random window corners (pixels) aligned to the coarsest stride, for ``batch``."""
        top = max(self.size // s[1] for s in self.shapes)
        m = max(0, (self.size - crop) // top)
        return [(int(rng.integers(0, m + 1)) * top, int(rng.integers(0, m + 1)) * top) for _ in range(n)]

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
            offsets = self.random_offsets(len(indices), crop, r)
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
