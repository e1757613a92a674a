"""A split detector computes what the whole one does, and the ONNX front matches torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from palettelink.front import Front
from palettelink.image import letterbox, load_image
from palettelink.models.ultra import crossing_layers


def test_crossing_tensors_after_sppf(detector, bundle) -> None:  # noqa: ANN001
    # The YOLOv8 head reads layers 4 and 6 through skips and 9 directly.
    assert detector.crossing == [4, 6, 9]
    assert [t.shape for t in bundle.tensors] == [(128, 80, 80), (256, 40, 40), (512, 20, 20)]


def test_crossing_scan_is_generic() -> None:
    class L:
        def __init__(self, f: int | list[int]) -> None:
            self.f = f

    layers = [L(-1), L(-1), L(-1), L([-1, 0]), L([1, 3])]
    assert crossing_layers(layers, 2) == [0, 1, 2]
    assert crossing_layers(layers, 3) == [1, 3]


def test_split_equals_unsplit(detector, images) -> None:  # noqa: ANN001
    for path in images:
        x, info = letterbox(load_image(path), 640)
        whole = detector.detect_image(x, info)
        with torch.inference_mode():
            tensors = [t.numpy() for t in detector.front(torch.from_numpy(x))]
        split = detector.detect_tensors(tensors, info)
        assert len(whole) == len(split) > 0
        for a, b in zip(whole, split, strict=True):
            assert a.class_id == b.class_id
            np.testing.assert_allclose(a.xyxy, b.xyxy, rtol=1e-3, atol=1e-3)
            assert a.score == pytest.approx(b.score, rel=1e-3)


def test_onnx_front_matches_torch(detector, bundle, images) -> None:  # noqa: ANN001
    front = Front(bundle)
    worst = 0.0
    for path in images:
        x, _ = letterbox(load_image(path), 640)
        with torch.inference_mode():
            ref = [t.numpy() for t in detector.front(torch.from_numpy(x))]
        got = front.run_tensor(x)
        for r, g in zip(ref, got, strict=True):
            assert r.shape == g.shape
            worst = max(worst, float(np.abs(r - g).max() / (np.abs(r).max() + 1e-9)))
    print(f"ONNX vs torch front: max abs diff relative to tensor range {worst:.2e}")
    assert worst < 1e-4
