"""COCO object detection: MobileNetV3 CenterNet (512² RGB 0..255, 80 classes, 100 boxes).

The graph already does CenterNet's decoding (3x3 max-pool peak picking, top-100, box edges from the
wh head), so ``tower_0/detections`` holds final boxes in 512-input pixels; what is left is the
letterbox in (upstream ``FaceDetector.preprocess``: aspect kept, centred, black padding — a plain
stretch costs recall on wide pictures), a score threshold, and the way back to image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

from palettelink.image import Letterbox, letterbox_info
from palettelink.models.zoo import LazySession

SIZE = 512
INPUT = "tower_0/images:0"
OUTPUT = "tower_0/detections:0"

COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


class Detection(NamedTuple):
    """One box in original-image pixels; unpacks as ``(x1, y1, x2, y2, class_id, score)``."""

    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int
    score: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def name(self) -> str:
        return COCO80[self.class_id] if 0 <= self.class_id < len(COCO80) else str(self.class_id)


@dataclass
class Detections:
    detections: list[Detection] = field(default_factory=list)

    def names(self) -> list[str]:
        return [d.name for d in self.detections]


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept, best first. CenterNet's peak picking leaves the odd twin box (two neighbouring
    peaks of one object); a loose per-class NMS removes those without touching crowds."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    for i in order:
        ok = True
        for j in keep:
            if classes[j] != classes[i]:
                continue
            w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            inter = max(w, 0.0) * max(h, 0.0)
            if inter > iou * (area[i] + area[j] - inter):
                ok = False
                break
        if ok:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


class CenterNet:
    """``run(rgb)`` → :class:`Detections`; ``postprocess`` alone also serves a split bundle's tail."""

    NAME = "centernet"
    CLASS_NAMES = COCO80

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 score_threshold: float = 0.3, iou: float = 0.7) -> None:
        self.session = LazySession(session_or_path, self.NAME, providers)
        self.score_threshold, self.iou = score_threshold, iou

    def preprocess(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], Letterbox]:
        h, w = rgb.shape[:2]
        lb = letterbox_info(w, h, SIZE)
        nw, nh = round(w * lb.scale), round(h * lb.scale)
        canvas = np.zeros((SIZE, SIZE, 3), np.float32)
        canvas[lb.pad_y:lb.pad_y + nh, lb.pad_x:lb.pad_x + nw] = cv2.resize(
            np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_LINEAR)
        return {INPUT: canvas[None]}, lb

    def postprocess(self, outputs: list[np.ndarray], meta: Letterbox,
                    score_threshold: float | None = None) -> Detections:
        """``outputs``: the session's outputs (the first one shaped [..., 6] is used); ``meta``: the
        letterbox that made the network input, so boxes land in original pixels, clipped."""
        thr = self.score_threshold if score_threshold is None else score_threshold
        det = next(np.asarray(o) for o in outputs if np.asarray(o).shape[-1] == 6).reshape(-1, 6)
        det = det[np.isfinite(det).all(axis=1) & (det[:, 4] >= thr)]
        if not len(det):
            return Detections()
        boxes = meta.boxes_to_image(det[:, :4])
        classes = np.rint(det[:, 5]).astype(np.int64)
        keep = nms_per_class(boxes, det[:, 4], classes, self.iou)
        return Detections([Detection(*(float(v) for v in boxes[i]), int(classes[i]), float(det[i, 4]))
                           for i in keep])

    postprocess_letterboxed = postprocess  # name used by the split-bundle path (server/tasks/detect.py)

    def run(self, rgb: np.ndarray, score_threshold: float | None = None) -> Detections:
        feeds, meta = self.preprocess(rgb)
        return self.postprocess(self.session.run(feeds, [OUTPUT]), meta, score_threshold)
