"""Pose: 17 COCO keypoints per person (x, y, confidence), with the person's box."""

from __future__ import annotations

from typing import Any

from server.results import TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner, add_points


@register("pose")
class PoseRunner(ZooRunner):
    task = "pose"

    def convert(self, result: Any) -> TaskOutput:
        out = TaskOutput()
        for p in result.people:
            add_points(out, p.box, "person", p.score, p.keypoints, "coco17", confidence=True)
        return out
