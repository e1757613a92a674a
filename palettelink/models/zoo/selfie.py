"""Person segmentation: MediaPipe Selfie (256², sigmoid) and Google Meet (144x256, 2-class logits).

Both were trained on plain resized frames (no letterbox: MediaPipe stretches the camera image), so
the probability map is resized back over the whole original image and thresholded there; resizing
probabilities rather than the binary mask keeps the edge where the model put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from palettelink.models.zoo import LazySession


@dataclass
class Segmentation:
    mask: np.ndarray  # HxW bool, original pixels: True where a person is

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


class Selfie:
    NAME = "selfie"
    CLASS_NAMES = ("person",)
    INPUT, OUTPUT, HW = "input_1:0", "activation_10:0", (256, 256)

    def __init__(self, session_or_path: Any = None, providers: list[str] | None = None,
                 threshold: float = 0.5) -> None:
        self.session = LazySession(session_or_path, self.NAME, providers)
        self.threshold = threshold

    def preprocess(self, rgb: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        h, w = self.HW
        x = cv2.resize(np.ascontiguousarray(rgb), (w, h), interpolation=cv2.INTER_LINEAR)
        return {self.INPUT: (x.astype(np.float32) / 255.0)[None]}, rgb.shape[:2]

    def probability(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Person probability at the network's resolution."""
        return np.asarray(outputs[0], np.float32)[0, :, :, 0]

    def postprocess(self, outputs: list[np.ndarray], meta: tuple[int, int]) -> Segmentation:
        h, w = meta
        p = cv2.resize(self.probability(outputs), (w, h), interpolation=cv2.INTER_LINEAR)
        return Segmentation(p > self.threshold)

    def run(self, rgb: np.ndarray) -> Segmentation:
        feeds, meta = self.preprocess(rgb)
        return self.postprocess(self.session.run(feeds, [self.OUTPUT]), meta)


class Meet(Selfie):
    """Channel 1 of ``segment`` is the person; a softmax over the two channels is its probability."""

    NAME = "meet"
    INPUT, OUTPUT, HW = "input_1:0", "segment:0", (144, 256)

    def probability(self, outputs: list[np.ndarray]) -> np.ndarray:
        logits = np.asarray(outputs[0], np.float32)[0]
        return 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))
