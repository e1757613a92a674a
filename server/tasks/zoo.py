"""Task runners backed by the model zoo (palettelink/models/zoo), for bundles that name a zoo model
per task (``manifest["task_models"]``):

- family ``image``: the codec's generator rebuilt the picture x̂; the unsplit zoo model runs on it,
  and x̂ itself is the preview a person can look at (``want_preview``);
- family ``onnx``: the bundle's ``tail.onnx`` runs on the rebuilt crossing tensors (onnxruntime, CUDA
  provider when present), then the zoo model's postprocess.

A subclass says only how a zoo result becomes a :class:`~server.results.TaskOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import cv2
import numpy as np

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.models import family_of, task_model
from palettelink.models.image import rebuilt_image
from server.results import Box, LandmarkSet, TaskOutput

PREVIEW_QUALITY = 85


def preview_jpeg(rgb: np.ndarray, quality: int = PREVIEW_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return bytes(buf) if ok else b""


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    want = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in [*want, "CPUExecutionProvider"] if p in ort.get_available_providers()]


def add_points(out: TaskOutput, box: Sequence[float], label: str, score: float, points: Any, scheme: str,
               confidence: bool) -> None:
    """One boxed point set (a face's mesh, a person's keypoints) into ``out``: the box under ``label``
    and the points as (x, y, confidence) — each point's own third value where ``confidence`` (pose),
    else 1.0 (the face mesh's third value is depth, not a score)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    out.boxes.append(Box(x1, y1, x2, y2, 0, label, float(score)))
    pts = tuple((float(p[0]), float(p[1]), float(p[2]) if confidence else 1.0) for p in points)
    out.landmarks.append(LandmarkSet(points=pts, scheme=scheme, score=float(score)))


class ZooRunner:
    """Runs the zoo model the bundle names for ``task`` (set by each subclass)."""

    task: ClassVar[str]
    families: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        from palettelink.models import zoo

        self.bundle = bundle
        found = task_model(bundle, self.task)
        assert found is not None, "supports() was checked first"
        self.model = zoo.load(found[0], bundle.file(found[1]), providers=providers_for(device))

    @classmethod
    def supports(cls, bundle: Bundle) -> bool:
        return family_of(bundle) in cls.families and task_model(bundle, cls.task) is not None

    def convert(self, result: Any) -> TaskOutput:
        raise NotImplementedError

    def output(self, rgb: np.ndarray) -> TaskOutput:
        """The task's output for one rebuilt picture (a subclass may look at more than the model)."""
        return self.convert(self.model.run(rgb))

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        outs = []
        for d in items:
            rgb = rebuilt_image(d.tensors[0], d.image_size, self.bundle.input_size)
            out = self.output(rgb)
            if want_preview:
                out.preview_jpeg = preview_jpeg(rgb)
            outs.append(out)
        return outs

    def warmup(self) -> None:
        self.model.run(np.full((self.bundle.input_size, self.bundle.input_size, 3), 114, np.uint8))
