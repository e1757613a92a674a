"""Image loading and the letterbox both sides agree on (numpy + OpenCV, no torch).

The network sees a square ``size``×``size`` RGB tensor in [0, 1], the image scaled to fit and padded
with grey 114 (ultralytics' convention). Boxes come back in original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from palettelink.errors import InvalidRequest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v"}


@dataclass(frozen=True)
class Letterbox:
    scale: float
    pad_x: int
    pad_y: int
    width: int  # original image size
    height: int

    def boxes_to_image(self, xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from network pixels back to the original image, clipped to it."""
        b = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.pad_x) / self.scale
        b[:, [1, 3]] = (b[:, [1, 3]] - self.pad_y) / self.scale
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.height)
        return b


def letterbox_info(width: int, height: int, size: int) -> Letterbox:
    scale = min(size / width, size / height)
    nw, nh = round(width * scale), round(height * scale)
    return Letterbox(scale, (size - nw) // 2, (size - nh) // 2, width, height)


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """``rgb`` uint8 HxWx3 → float32 1x3xSxS in [0, 1] and the mapping back."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidRequest(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    info = letterbox_info(w, h, size)
    nw, nh = round(w * info.scale), round(h * info.scale)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else rgb
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[info.pad_y : info.pad_y + nh, info.pad_x : info.pad_x + nw] = resized
    x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(x), info


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8; a clear error for anything unreadable."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidRequest(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
