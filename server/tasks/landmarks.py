"""Facial landmarks: each face's box and its points (mediapipe's 468-point mesh)."""

from __future__ import annotations

from typing import Any

from server.results import TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner, add_points


@register("landmarks")
class LandmarksRunner(ZooRunner):
    task = "landmarks"

    def convert(self, result: Any) -> TaskOutput:
        out = TaskOutput()
        for f in result.faces:
            add_points(out, f.box, "face", f.score, f.points, f"mediapipe{len(f.points)}", confidence=False)
        return out
