"""Facial landmarks: each face's box and its points (mediapipe's 468-point mesh)."""

from __future__ import annotations

from typing import Any

from server.results import Box, LandmarkSet, TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner


@register("landmarks")
class LandmarksRunner(ZooRunner):
    task = "landmarks"

    def convert(self, result: Any) -> TaskOutput:
        out = TaskOutput()
        for f in result.faces:
            x1, y1, x2, y2 = (float(v) for v in f.box)
            out.boxes.append(Box(x1, y1, x2, y2, 0, "face", float(f.score)))
            out.landmarks.append(LandmarkSet(points=tuple((float(p[0]), float(p[1]), 1.0) for p in f.points),
                                             scheme=f"mediapipe{len(f.points)}", score=float(f.score)))
        return out
