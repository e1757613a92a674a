"""Faces: BlazeFace short range (128², SSD anchors) finds them, MediaPipe Face Mesh (192²) puts 468
points on each.

BlazeFace's raw output is per anchor (score logit, box, 6 keypoints as pixel offsets from the anchor
centre); MediaPipe decodes it with fixed-size anchors and a *weighted* NMS (overlapping candidates
are score-averaged rather than dropped, which steadies the box). The mesh model wants a face-centred
square crop with margin; this crop is axis-aligned (no roll correction), so strongly tilted heads
get a looser fit: enough for boxes and landmarks on rebuilt images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from palettelink.models.zoo import LazySession
from palettelink.models.zoo.movenet import Square, pad_square

DETECTOR = "facemesh-detection-short"
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear_tragion", "left_ear_tragion")


@cache
def anchors(size: int = 128) -> np.ndarray:
    """896x2 anchor centres in input pixels: stride 8 (2 per cell), then stride 16 (6 per cell),
    row-major, as MediaPipe's SsdAnchorsCalculator makes them for the short-range model."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) + 0.5
        out.append(np.repeat(centres * stride, per_cell, axis=0))
    a = np.concatenate(out)
    a.setflags(write=False)
    return a


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, original pixels (from the detector)
    score: float                             # detector score
    keypoints: np.ndarray                    # 6x2 (x, y), KEYPOINTS order
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # 468x3 (x, y, z)
    mesh_score: float = 0.0                  # face-presence probability of the mesh model


@dataclass
class Faces:
    faces: list[Face] = field(default_factory=list)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, extra: np.ndarray,
                 iou: float) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """MediaPipe's WEIGHTED suppression: each cluster (IoU > ``iou`` with its best box) becomes the
    score-weighted mean of its boxes and keypoints, with the best score."""
    order = list(np.argsort(-scores, kind="stable"))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out = []
    while order:
        top = order[0]
        rest = np.asarray(order)
        w = (np.minimum(boxes[rest, 2], boxes[top, 2]) - np.maximum(boxes[rest, 0], boxes[top, 0])).clip(0)
        h = (np.minimum(boxes[rest, 3], boxes[top, 3]) - np.maximum(boxes[rest, 1], boxes[top, 1])).clip(0)
        inter = w * h
        overlap = inter / np.maximum(area[rest] + area[top] - inter, 1e-9)
        cluster = rest[overlap > iou]
        cluster = cluster if len(cluster) else rest[:1]
        wts = scores[cluster][:, None]
        out.append(((boxes[cluster] * wts).sum(0) / wts.sum(), float(scores[top]),
                    (extra[cluster] * wts).sum(0) / wts.sum()))
        taken = set(cluster.tolist())
        order = [i for i in order if i not in taken]
    return out


class BlazeFace:
    """``run(rgb)`` → :class:`Faces` with boxes and the 6 detector keypoints (no mesh)."""

    NAME = DETECTOR
    CLASS_NAMES = ("face",)
    INPUT, OUTPUT, SIZE = "input:0", "Identity:0", 128

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 score_threshold: float = 0.5, iou: float = 0.3) -> None:
        self.session = LazySession(session_or_path, self.NAME, providers)
        self.score_threshold, self.iou = score_threshold, iou

    def preprocess(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], Square]:
        x, sq = pad_square(np.ascontiguousarray(rgb), self.SIZE)
        return {self.INPUT: x.astype(np.float32) / 127.5 - 1.0}, sq

    def postprocess(self, outputs: list[np.ndarray], meta: Square) -> Faces:
        raw = np.asarray(outputs[0], np.float32).reshape(-1, 17)
        scores = 1.0 / (1.0 + np.exp(-raw[:, 0].clip(-80, 80)))  # float32 exp overflows past 88
        keep = scores >= self.score_threshold
        if not keep.any():
            return Faces()
        a, raw, scores = anchors(self.SIZE)[keep], raw[keep], scores[keep]
        centre, half = raw[:, 1:3] + a, raw[:, 3:5] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = (raw[:, 5:17].reshape(-1, 6, 2) + a[:, None, :]).reshape(-1, 12)
        k = meta.side / self.SIZE
        pad = np.array([meta.pad_x, meta.pad_y], np.float32)
        faces = []
        for box, score, kp in weighted_nms(boxes, scores, kps, self.iou):
            b = box.reshape(2, 2) * k - pad
            b = np.clip(b, 0, [meta.width, meta.height])
            faces.append(Face((float(b[0, 0]), float(b[0, 1]), float(b[1, 0]), float(b[1, 1])), score,
                              (kp.reshape(6, 2) * k - pad).astype(np.float32)))
        return Faces(faces)

    def run(self, rgb: np.ndarray) -> Faces:
        feeds, meta = self.preprocess(rgb)
        return self.postprocess(self.session.run(feeds, [self.OUTPUT]), meta)


class FaceMesh:
    """BlazeFace, then a ×``expand`` square crop around each face → 468 points per face.

    ``session_or_path`` is the mesh model; the detector is ``detector`` if given, else the
    ``facemesh-detection-short.onnx`` beside a given mesh file, else the zoo's own."""

    NAME = "facemesh"
    CLASS_NAMES = ("face",)
    INPUT, MESH, FLAG, SIZE = "input_1:0", "Identity_2:0", "Identity_1:0", 192

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 detector: Any = None, expand: float = 1.5, mesh_threshold: float = 0.5) -> None:
        self.session = LazySession(session_or_path, self.NAME, providers)
        if detector is None and isinstance(session_or_path, (str, Path)):
            sibling = Path(session_or_path).with_name(f"{DETECTOR}.onnx")
            detector = sibling if sibling.is_file() else None
        self.detector = detector if isinstance(detector, BlazeFace) else BlazeFace(detector, providers)
        self.expand, self.mesh_threshold = expand, mesh_threshold

    def crops(self, rgb: np.ndarray, faces: Faces) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
        """N face crops [N,192,192,3] in 0..1 and each crop's (x0, y0, side) in original pixels."""
        xs, where = [], []
        for f in faces.faces:
            x1, y1, x2, y2 = f.box
            side = max(x2 - x1, y2 - y1) * self.expand
            x0, y0 = (x1 + x2 - side) / 2, (y1 + y2 - side) / 2
            k = self.SIZE / max(side, 1e-6)
            m = np.array([[k, 0, -x0 * k], [0, k, -y0 * k]], np.float32)
            xs.append(cv2.warpAffine(rgb, m, (self.SIZE, self.SIZE), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)))
            where.append((x0, y0, side))
        return np.stack(xs).astype(np.float32) / 255.0, where

    def preprocess(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[Faces, list[Any]]]:
        """Runs the detector (the mesh input depends on where the faces are)."""
        rgb = np.ascontiguousarray(rgb)
        faces = self.detector.run(rgb)
        if not faces.faces:
            return {}, (faces, [])
        x, where = self.crops(rgb, faces)
        return {self.INPUT: x}, (faces, where)

    def postprocess(self, outputs: list[np.ndarray], meta: tuple[Faces, list[Any]]) -> Faces:
        faces, where = meta
        if not where:
            return Faces()
        mesh = np.asarray(outputs[0], np.float32).reshape(len(where), 468, 3)
        flags = np.asarray(outputs[1], np.float32).reshape(-1)
        out = []
        for f, pts, flag, (x0, y0, side) in zip(faces.faces, mesh, flags, where, strict=True):
            if flag < self.mesh_threshold:
                continue
            k = side / self.SIZE
            p = pts * k + np.array([x0, y0, 0.0], np.float32)
            out.append(Face(f.box, f.score, f.keypoints, p.astype(np.float32), float(flag)))
        return Faces(out)

    def run(self, rgb: np.ndarray) -> Faces:
        feeds, meta = self.preprocess(rgb)
        if not feeds:
            return Faces()
        return self.postprocess(self.session.run(feeds, [self.MESH, self.FLAG]), meta)
