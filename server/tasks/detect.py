"""Detection: decoded split tensors → the bundle's detector tail → boxes in image pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.image import letterbox_info
from palettelink.models.ultra import Detection, SplitDetector
from server.results import Box, TaskOutput
from server.tasks import register


@register("detect")
class DetectRunner:
    """Runs :class:`palettelink.models.ultra.SplitDetector` (torch) on decoded tensors."""

    name = "detect"

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.bundle = bundle
        self.detector = SplitDetector.from_bundle(bundle, device=device)
        self.class_names = list(self.detector.class_names or bundle.class_names)

    @classmethod
    def supports(cls, bundle: Bundle) -> bool:
        return bundle.task == "detect" or "detect" in bundle.manifest.get("tasks", [])

    def _name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else str(class_id)

    def _output(self, dets: Sequence[Detection]) -> TaskOutput:
        return TaskOutput(boxes=[
            Box(x1=float(d.xyxy[0]), y1=float(d.xyxy[1]), x2=float(d.xyxy[2]), y2=float(d.xyxy[3]),
                class_id=int(d.class_id), class_name=self._name(int(d.class_id)), score=float(d.score))
            for d in dets
        ])

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        """One tail pass over the whole batch (frames from all streams), then NMS per frame."""
        lbs = [letterbox_info(*d.image_size, self.bundle.input_size) for d in items]
        if len(items) == 1:
            return [self._output(self.detector.detect_tensors(items[0].tensors, lbs[0]))]
        with torch.inference_mode():
            batch = [
                torch.from_numpy(np.ascontiguousarray(np.concatenate([d.tensors[i] for d in items]),
                                                      dtype=np.float32)).to(self.detector.device)
                for i in range(len(self.bundle.tensors))
            ]
            preds = self.detector.tail(batch)
            return [self._output(self.detector.postprocess(preds[k : k + 1], lb)) for k, lb in enumerate(lbs)]

    def warmup(self) -> None:
        zeros = [np.zeros((1, *t.shape), np.float32) for t in self.bundle.tensors]
        s = self.bundle.input_size
        self.detector.detect_tensors(zeros, letterbox_info(s, s, s))
