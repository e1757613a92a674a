"""Person segmentation: a mask over the original image, as run-length counts (``Mask``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from palettelink import rle
from server.results import Mask, TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner


@register("segment")
class SegmentRunner(ZooRunner):
    task = "segment"

    def convert(self, result: Any) -> TaskOutput:
        mask = np.asarray(result.mask, bool)
        if not mask.any():  # nobody in the picture: no mask, not an error
            return TaskOutput()
        h, w = mask.shape
        return TaskOutput(masks=[Mask(width=w, height=h, counts=tuple(rle.encode(mask)), class_id=0,
                                      score=float(mask.mean()))])
