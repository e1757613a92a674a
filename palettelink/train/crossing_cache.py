"""A disk cache of the frozen front's crossing tensors for every training (item, augmentation
variant), so training epochs never re-run the front.

:class:`CrossingCache` keeps the tensors as fp16 memmaps (the items come from
:mod:`palettelink.train.data`, the views from :mod:`palettelink.train.augment`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from palettelink.image import Letterbox
from palettelink.train.augment import augmented_input, mosaic_input, paste_people, person_crops
from palettelink.train.data import Item, item_key, load_all_rgb, load_rgb

if TYPE_CHECKING:
    import torch


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
                 progress: bool = True, mosaic: float = 0.3, paste: float = 0.0,
                 paste_lying: float = 0.0) -> None:
        if not isinstance(size, int):  # called as CrossingCache(det, items, cache_dir, ...)
            size, cache_dir = 640, size
        self.det = det
        self.items = list(items)
        self.size = int(size)
        self.augment = int(augment)
        self.seed = int(seed)
        self.mosaic = float(mosaic)
        self.paste = float(paste)
        self.paste_lying = float(paste_lying)
        self._crops: list[np.ndarray] | None = None
        self.entries = [CacheEntry(it, v) for it in self.items for v in range(self.augment + 1)]
        self.shapes: list[tuple[int, int, int]] = self._shapes()
        meta = {"items": [item_key(i) for i in self.items], "size": self.size, "augment": self.augment,
                "seed": self.seed, "front": _weights_tag(det), "shapes": self.shapes,
                "mosaic": self.mosaic, "augment_version": 2, **({"paste": self.paste} if self.paste else {}),
                **({"paste_lying": self.paste_lying} if self.paste and self.paste_lying else {})}
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
            x = paste_people(x, self._person_crops(), rng, self.paste_lying)
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
