"""Detection: boxes in image pixels with class names, for every model family.

- ``ultralytics``: the decoded split tensors through the YOLO tail, one pass per batch: in
  onnxruntime where the bundle has ``tail.onnx`` (:mod:`palettelink.models.ultra_ort`; on the frame's
  window of the letterbox when the decoder cut one), else in torch;
- ``image``: the zoo detector (COCO CenterNet) on the rebuilt picture x̂;
- ``onnx``: the bundle's ``tail.onnx`` on the decoded tensors, then the zoo detector's postprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.codecs import Decoded
from palettelink.image import letterbox_info
from palettelink.models import family_of, task_model
from server.results import Box, TaskOutput
from server.tasks import register
from server.tasks.zoo import ZooRunner, providers_for


def _boxes(dets: Sequence[Any], names: Sequence[str]) -> TaskOutput:
    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    return TaskOutput(boxes=[
        Box(x1=float(d.xyxy[0]), y1=float(d.xyxy[1]), x2=float(d.xyxy[2]), y2=float(d.xyxy[3]),
            class_id=int(d.class_id), class_name=name(int(d.class_id)), score=float(d.score))
        for d in dets
    ])


class _YoloDetect:
    """:class:`palettelink.models.ultra.SplitDetector` (torch) on decoded tensors."""

    def __init__(self, bundle: Bundle, device: str) -> None:
        from palettelink.models.ultra import SplitDetector

        self.bundle = bundle
        self.detector = SplitDetector.from_bundle(bundle, device=device)
        self.class_names = list(self.detector.class_names or bundle.class_names)

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        """One tail pass over the whole batch (frames from all streams), then NMS per frame."""
        import torch

        lbs = [letterbox_info(*d.image_size, self.bundle.input_size) for d in items]
        if len(items) == 1:
            return [_boxes(self.detector.detect_tensors(items[0].tensors, lbs[0]), self.class_names)]
        with torch.inference_mode():
            batch = [
                torch.from_numpy(np.ascontiguousarray(np.concatenate([d.tensors[i] for d in items]),
                                                      dtype=np.float32)).to(self.detector.device)
                for i in range(len(self.bundle.tensors))
            ]
            preds = self.detector.tail(batch)
            return [_boxes(self.detector.postprocess(preds[k : k + 1], lb), self.class_names)
                    for k, lb in enumerate(lbs)]

    def warmup(self) -> None:
        zeros = [np.zeros((1, *t.shape), np.float32) for t in self.bundle.tensors]
        s = self.bundle.input_size
        self.detector.detect_tensors(zeros, letterbox_info(s, s, s))


class _YoloOrt:
    """The YOLO tail in onnxruntime (``tail.onnx``, int8 where the bundle measured it agreeing:
    :mod:`palettelink.models.ultra_ort`), on the whole letterbox or on a frame's window of it
    (``Decoded.window``, from the windowed palette decoder); NMS as the torch path does it."""

    accepts_window = True

    def __init__(self, bundle: Bundle, device: str) -> None:
        from palettelink.models.ultra_ort import OrtTail

        self.bundle = bundle
        self.tail = OrtTail(bundle, device=device)
        self.class_names = list(bundle.class_names)

    def _boxes(self, preds: np.ndarray, d: Decoded) -> TaskOutput:
        from palettelink.image import window_letterbox
        from palettelink.models.ultra import postprocess

        lb = window_letterbox(letterbox_info(*d.image_size, self.bundle.input_size), d.window)
        return _boxes(postprocess(preds, lb), self.class_names)

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        """Frames of one shape (window) go through the tail together, then NMS per frame."""
        groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
        for k, d in enumerate(items):
            groups.setdefault(tuple(t.shape for t in d.tensors), []).append(k)
        out: list[TaskOutput | None] = [None] * len(items)
        for ks in groups.values():
            group = [items[k].tensors for k in ks]
            ts = [group[0][i] if len(ks) == 1 else np.concatenate([g[i] for g in group])
                  for i in range(len(self.bundle.tensors))]
            preds = self.tail.run(ts)
            for j, k in enumerate(ks):
                out[k] = self._boxes(preds[j : j + 1], items[k])
        return out  # type: ignore[return-value]

    def warmup(self) -> None:
        self.tail.run([np.zeros((1, *t.shape), np.float32) for t in self.bundle.tensors])


class _ImageDetect(ZooRunner):
    task = "detect"

    def convert(self, result: Any) -> TaskOutput:
        return _boxes(result.detections, self.bundle.class_names)


class _OnnxDetect:
    """tail.onnx on the decoded crossing tensors → the zoo detector's postprocess (letterbox space)."""

    def __init__(self, bundle: Bundle, device: str) -> None:
        from palettelink.front import ort_session
        from palettelink.models import zoo

        self.bundle = bundle
        found = task_model(bundle, "detect")
        assert found is not None
        self.tail = ort_session(str(bundle.file(found[1])))
        self.tail.set_providers(providers_for(device))
        self.inputs = [i.name for i in self.tail.get_inputs()]
        self.post = zoo.load(found[0], None)

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        out = []
        for d in items:
            raw = self.tail.run(None, dict(zip(self.inputs, d.tensors, strict=True)))
            lb = letterbox_info(*d.image_size, self.bundle.input_size)
            out.append(_boxes(self.post.postprocess_letterboxed(raw, lb).detections, self.bundle.class_names))
        return out

    def warmup(self) -> None:
        self.tail.run(None, {n: np.zeros((1, *t.shape), np.float32)
                             for n, t in zip(self.inputs, self.bundle.tensors, strict=True)})


_BY_FAMILY: dict[str, Any] = {"ultralytics": _YoloDetect, "image": _ImageDetect, "onnx": _OnnxDetect}


@register("detect")
class DetectRunner:
    """Picks the family's implementation; the service sees one runner per task."""

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        from palettelink.models.ultra_ort import uses_onnxruntime

        self.bundle = bundle
        fam = family_of(bundle)
        # an ultralytics bundle with tail.onnx runs it in onnxruntime; older ones keep the torch tail
        impl = _YoloOrt if fam == "ultralytics" and uses_onnxruntime(bundle, device) else _BY_FAMILY[fam]
        self.impl = impl(bundle, device)
        self.runtime = "onnxruntime" if impl is _YoloOrt or fam == "onnx" else "torch"

    @property
    def accepts_window(self) -> bool:
        """Whether this runner reads windowed tensors (``Decoded.window``; the onnxruntime YOLO tail)."""
        return bool(getattr(self.impl, "accepts_window", False))

    @classmethod
    def supports(cls, bundle: Bundle) -> bool:
        fam = family_of(bundle)
        if fam != "ultralytics" and task_model(bundle, "detect") is None:
            return False
        return bundle.task == "detect" or "detect" in bundle.manifest.get("tasks", [])

    @property
    def detector(self) -> Any:  # the YOLO family's torch detector (tests and the serving bench use it)
        return self.impl.detector

    def run_batch(self, items: Sequence[Decoded], want_preview: bool = False) -> list[TaskOutput]:
        return self.impl.run_batch(items, want_preview)

    def warmup(self) -> None:
        self.impl.warmup()
