"""Training views from a few pictures: the augmentations behind the crossing-tensor cache.

The teacher needs no labels, so any appearance change a camera could make is free data: zoom, crop,
flip and colour jitter (:func:`augmented_input`), 2×2 mosaics (:func:`mosaic_input`), and people cut
out of the pictures that have them and pasted at every scale onto any background
(:func:`person_crops`, :func:`paste_people`) because people-rich material is thin offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from palettelink.image import Letterbox, letterbox, letterbox_info


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


def paste_people(x: np.ndarray, crops: Sequence[np.ndarray], rng: np.random.Generator,
                 lying: float = 0.0) -> np.ndarray:
    """Paste 1–6 of ``crops`` onto the network input ``x`` [1, 3, S, S] at random places and heights
    from 4 % (far away) to 95 % (close-up) of the canvas, each h-flipped half of the time.

    ``lying``: the probability that a pasted person is turned a quarter turn (either way) to lie on
    the ground. The fall bundle's teacher calls such figures Fall; the corpus shows almost nobody
    fallen (the teacher found 1 Fall among 14 upright pastes, 6 among 12 turned ones), so without
    them its rare class gets next to no training signal. 0 draws nothing extra: views made without
    it stay identical."""
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
        if lying > 0 and rng.random() < lying:
            r = np.rot90(r, k=1 if rng.random() < 0.5 else -1)
        rh, rw = r.shape[:2]
        px, py = int(rng.integers(0, size - rw + 1)), int(rng.integers(0, size - rh + 1))
        a = r[..., 3:4].astype(np.float32) / 255.0
        region = out[py:py + rh, px:px + rw]
        out[py:py + rh, px:px + rw] = region * (1 - a) + (r[..., :3].astype(np.float32) / 255.0) * a
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None])
