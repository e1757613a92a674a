"""Person segmentation: a mask over the original image, as run-length counts (``Mask``).

The selfie model is made for frames that hold a person: on a picture of a cup it marks the cup. When
the bundle has a detector, the mask is kept only inside (slightly grown) boxes of the people it finds,
so a scene with nobody in it gives no mask."""

from __future__ import annotations

from typing import Any

import numpy as np

from palettelink import rle
from palettelink.bundle import Bundle
from palettelink.models import task_model
from server.results import Mask, TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner, providers_for

PERSON = 0  # COCO class id
GROW = 0.1


@register("segment")
class SegmentRunner(ZooRunner):
    task = "segment"

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        from palettelink.models import zoo

        super().__init__(bundle, device)
        det = task_model(bundle, "detect")
        self.detector = (zoo.load(det[0], bundle.file(det[1]), providers=providers_for(device))
                         if det else None)

    def gate(self, rgb: np.ndarray) -> np.ndarray | None:
        """Where people are (boxes grown by 10 %), or None without a detector."""
        if self.detector is None:
            return None
        keep = np.zeros(rgb.shape[:2], bool)
        h, w = keep.shape
        for d in self.detector.run(rgb).detections:
            if d.class_id != PERSON:
                continue
            x1, y1, x2, y2 = d.xyxy
            gx, gy = GROW * (x2 - x1), GROW * (y2 - y1)
            ya, yb = max(0, int(y1 - gy)), min(h, int(y2 + gy) + 1)
            keep[ya:yb, max(0, int(x1 - gx)):min(w, int(x2 + gx) + 1)] = True
        return keep

    def output(self, rgb: np.ndarray) -> TaskOutput:
        mask = np.asarray(self.model.run(rgb).mask, bool)
        keep = self.gate(rgb)
        return self.convert(mask if keep is None else mask & keep)

    def convert(self, result: Any) -> TaskOutput:
        mask = np.asarray(result, bool)
        if not mask.any():  # nobody in the picture: no mask, not an error
            return TaskOutput()
        h, w = mask.shape
        return TaskOutput(masks=[Mask(width=w, height=h, counts=tuple(rle.encode(mask)), class_id=0,
                                      score=float(mask.mean()))])
