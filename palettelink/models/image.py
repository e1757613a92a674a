"""The image family's tail: the rebuilt letterboxed image x̂ back in the original geometry.

The codec's generator outputs x̂ [1,3,S,S] in [0, 1] (the one crossing tensor of an image bundle);
every unsplit task model then sees what a camera would have sent, at the bundle's resolution, and
reports in original-image pixels with no mapping of its own.
"""

from __future__ import annotations

import cv2
import numpy as np

from palettelink.image import letterbox_info


def rebuilt_image(tensor: np.ndarray, image_size: tuple[int, int], size: int) -> np.ndarray:
    """x̂ [1,3,S,S] → HxWx3 uint8 RGB at the original ``image_size`` (W, H)."""
    w, h = image_size
    lb = letterbox_info(w, h, size)
    nw, nh = round(w * lb.scale), round(h * lb.scale)
    x = np.asarray(tensor, np.float32).reshape(3, size, size)
    x = x[:, lb.pad_y:lb.pad_y + nh, lb.pad_x:lb.pad_x + nw]
    rgb = np.ascontiguousarray((np.clip(x, 0.0, 1.0).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8))
    if (w, h) == (nw, nh):
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR if w > nw else cv2.INTER_AREA)
