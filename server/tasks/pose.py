"""Pose: 17 COCO keypoints per person (x, y, confidence), with the person's box."""

from __future__ import annotations

from typing import Any

from server.results import Box, LandmarkSet, TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner


@register("pose")
class PoseRunner(ZooRunner):
    task = "pose"

    def convert(self, result: Any) -> TaskOutput:
        out = TaskOutput()
        for p in result.people:
            x1, y1, x2, y2 = (float(v) for v in p.box)
            out.boxes.append(Box(x1, y1, x2, y2, 0, "person", float(p.score)))
            out.landmarks.append(LandmarkSet(points=tuple((float(k[0]), float(k[1]), float(k[2]))
                                                          for k in p.keypoints),
                                             scheme="coco17", score=float(p.score)))
        return out
