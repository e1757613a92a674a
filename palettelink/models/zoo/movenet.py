"""Human pose: MoveNet Lightning (one person, 192²) and MoveNet MultiPose (up to 6, 256²).

MoveNet expects a square frame (its TF Hub guide pads with black, then resizes) and int32 pixels
0..255; keypoints come back as (y, x, score) in 0..1 of that square, in COCO keypoint order. The
single-person model always answers 17 points, so "nobody there" is decided from their scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

from palettelink.models.zoo import LazySession

KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)


class Square(NamedTuple):
    """The padded square the network saw: side and the image's offset in it, original pixels."""

    side: int
    pad_x: int
    pad_y: int
    width: int
    height: int

    def to_image(self, yx: np.ndarray) -> np.ndarray:
        """(..., 2) normalised (y, x) → (..., 2) (x, y) original pixels, clipped to the image."""
        x = (yx[..., 1] * self.side - self.pad_x).clip(0, self.width)
        y = (yx[..., 0] * self.side - self.pad_y).clip(0, self.height)
        return np.stack([x, y], axis=-1)


@dataclass
class Person:
    keypoints: np.ndarray  # 17x3 (x, y, score), original pixels, KEYPOINTS order
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float


@dataclass
class Poses:
    people: list[Person] = field(default_factory=list)


def pad_square(rgb: np.ndarray, size: int) -> tuple[np.ndarray, Square]:
    h, w = rgb.shape[:2]
    side = max(h, w)
    sq = Square(side, (side - w) // 2, (side - h) // 2, w, h)
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[sq.pad_y:sq.pad_y + h, sq.pad_x:sq.pad_x + w] = rgb
    x = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR if side < size else cv2.INTER_AREA)
    return x.astype(np.int32)[None], sq


class MoveNet:
    """One person. MoveNet Lightning is not a detector: it answers 17 points on any frame, so
    "somebody there" is a heuristic on their scores: mean ≥ ``person_threshold`` and at least
    ``min_sure`` points ≥ 0.5. Measured: people (bus, zidane, astronaut, messi) mean 0.35–0.61 with
    2–14 sure points; empty or object frames mean 0.04–0.29, but a chessboard reached 0.34 with
    one sure point. Use :class:`MoveNetMultiPose` (a real per-person score) when presence matters.
    ``keypoint_threshold``: points that count for the person's box."""

    NAME = "movenet-lightning"
    CLASS_NAMES = ("person",)
    INPUT, OUTPUT, SIZE = "input:0", "Identity:0", 192

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 person_threshold: float = 0.25, keypoint_threshold: float = 0.3, min_sure: int = 2) -> None:
        self.session = LazySession(session_or_path, self.NAME, providers)
        self.person_threshold, self.keypoint_threshold = person_threshold, keypoint_threshold
        self.min_sure = min_sure

    def preprocess(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], Square]:
        x, sq = pad_square(np.ascontiguousarray(rgb), self.SIZE)
        return {self.INPUT: x}, sq

    def _person(self, kp: np.ndarray, sq: Square, score: float, box: np.ndarray | None = None) -> Person:
        """``kp``: 17x3 (y, x, score) normalised; ``box``: (ymin, xmin, ymax, xmax) normalised, or
        None to take the bounds of the confident keypoints."""
        pts = np.concatenate([sq.to_image(kp[:, :2]), kp[:, 2:3]], axis=1).astype(np.float32)
        if box is not None:
            xy = sq.to_image(box.reshape(2, 2))
            b = (float(xy[0, 0]), float(xy[0, 1]), float(xy[1, 0]), float(xy[1, 1]))
        else:
            sure = pts[:, 2] >= self.keypoint_threshold
            good = pts[sure] if sure.any() else pts
            lo, hi = good[:, :2].min(axis=0), good[:, :2].max(axis=0)
            b = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
        return Person(pts, b, float(score))

    def postprocess(self, outputs: list[np.ndarray], meta: Square) -> Poses:
        kp = np.asarray(outputs[0], np.float32).reshape(17, 3)
        score = float(kp[:, 2].mean())
        if score < self.person_threshold or int((kp[:, 2] >= 0.5).sum()) < self.min_sure:
            return Poses()
        return Poses([self._person(kp, meta, score)])

    def run(self, rgb: np.ndarray) -> Poses:
        feeds, meta = self.preprocess(rgb)
        return self.postprocess(self.session.run(feeds, [self.OUTPUT]), meta)


class MoveNetMultiPose(MoveNet):
    """Up to 6 people; each row is 17 x (y, x, score), then the box and the person's score."""

    NAME = "movenet-multipose"
    SIZE = 256

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 person_threshold: float = 0.3, keypoint_threshold: float = 0.3) -> None:
        super().__init__(session_or_path, providers, person_threshold, keypoint_threshold)

    def postprocess(self, outputs: list[np.ndarray], meta: Square) -> Poses:
        rows = np.asarray(outputs[0], np.float32).reshape(-1, 56)
        rows = rows[np.argsort(-rows[:, 55], kind="stable")]
        return Poses([self._person(r[:51].reshape(17, 3), meta, float(r[55]), r[51:55])
                      for r in rows if r[55] >= self.person_threshold])
