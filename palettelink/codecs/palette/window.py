"""The frame's window of the letterbox for the palette latent (issue 17, rectangular input).

A 640×480 camera frame letterboxed to 640² is a quarter grey padding, and the edge graph (front,
bottleneck encoder, nearest-entry search) spent a quarter of its work on it. With a window the edge
runs ``edge.onnx`` (exported with dynamic height and width) on the rows and columns of the letterbox
that hold the picture, widened to the detector's coarsest stride (rows 64..576 for 640×480: a 40×32
latent instead of 40×40), and sends that latent. Nothing in the container changes: the header already
carries the image size and the latent's shape, and both sides compute the window from the image size
alone (:func:`palettelink.image.content_window`), so the window is never sent and never trusted.

The server's onnxruntime path decodes the window as it is (it cut the same window out of the square
latent before). Any other consumer gets the square back: the window is placed into a latent filled
with the palette entry of the letterbox's grey (``pad_indices``, measured when the bundle is built by
running ``edge.onnx`` on a grey square), so every task and the image preview see the shapes they
always saw.

The edge's novelty is a mean over the latent's cells; the threshold was calibrated on whole letterboxed
squares. A window's mean is put back on that scale with ``pad_novelty`` weighting the cells the window
leaves out: the value that best turns training pictures' window novelty into their square novelty,
fitted when the bundle is built (:func:`palettelink.train.export.grey_latent`; on the sample pictures
it lands within −0.08…+0.03 of the square's own, where the grey's interior value was 0.03–0.13 low).

A bundle built before this has a fixed-size edge graph and no ``pad_indices``: its edge sends squares
and its server refuses a window latent (``InvalidStream``), never decoding it wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from palettelink.bundle import Bundle
from palettelink.image import Window, content_window

CODEC = "palette"  # the palette codec's registry name (runtime.py registers it under this one)


def alignment_for(size: int, crossing_widths: Sequence[int], stride: int | None) -> int:
    """The coarsest stride among the crossing tensors (``size`` over their widths) and the latent's
    (32 for YOLOv8; 8 for the image bundle, whose one crossing tensor is the picture): a window cuts
    every one of them on whole cells."""
    return max([size // int(w) for w in crossing_widths] + [stride or 1])


def alignment(bundle: Bundle) -> int:
    """:func:`alignment_for` of a built bundle."""
    return alignment_for(bundle.input_size, [int(t.shape[2]) for t in bundle.tensors], latent_stride(bundle))


def entry(bundle: Bundle) -> dict[str, Any]:
    e = bundle.codecs.get(CODEC, {})
    return e if isinstance(e, dict) else {}


def latent_stride(bundle: Bundle) -> int | None:
    """Input pixels per latent cell (16), from the manifest's ``latent`` [C, h, w]."""
    latent = entry(bundle).get("latent")
    if isinstance(latent, list | tuple) and len(latent) == 3 and int(latent[1]) > 0:
        return bundle.input_size // int(latent[1])
    return None


def pad_indices(bundle: Bundle) -> np.ndarray | None:
    """Finest palette index per group of the letterbox's grey (None: a bundle built before windows)."""
    pad = entry(bundle).get("pad_indices")
    return np.asarray(pad, np.int64) if isinstance(pad, list) and pad else None


def supports_window(bundle: Bundle) -> bool:
    """Whether this bundle's palette codec can code and decode windows (see the module docstring)."""
    return pad_indices(bundle) is not None and latent_stride(bundle) is not None


def codec_codes_windows(bundle: Bundle, codec: str) -> bool:
    """Whether ``codec`` of ``bundle`` codes (and a server decodes) windows: what ``GetInfo`` and
    ``palettelink info`` report."""
    return codec == CODEC and supports_window(bundle)


def use_window(encoder: Any, on: bool = True) -> bool:
    """Ask ``encoder`` to code each frame's window (``on``) or the whole square; only a palette
    encoder of a bundle built with windows can. Returns whether it now codes windows."""
    if not getattr(encoder, "window_capable", False):
        return False
    encoder.window = on
    return bool(encoder.window)


def frame_window(bundle: Bundle, image_size: tuple[int, int]) -> Window | None:
    """The window of a picture of ``image_size`` (W, H); None where it is the whole square."""
    size = bundle.input_size
    win = content_window(image_size, size, alignment(bundle))
    if (win.x1 - win.x0, win.y1 - win.y0) == (size, size):
        return None
    return win


def window_latent_hw(bundle: Bundle, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of the window's latent for a picture of ``image_size``; None where no window applies."""
    stride = latent_stride(bundle)
    win = frame_window(bundle, image_size)
    if stride is None or win is None:
        return None
    return (win.y1 - win.y0) // stride, (win.x1 - win.x0) // stride


def place(ids: np.ndarray, win: Window, square_hw: tuple[int, int], stride: int,
          fill: Sequence[int] | np.ndarray) -> np.ndarray:
    """Index maps of a window [G, h, w] put into square maps [G, H, W] filled per group with ``fill``."""
    out = np.empty((ids.shape[0], *square_hw), dtype=ids.dtype)
    out[:] = np.asarray(fill, dtype=ids.dtype).reshape(-1, 1, 1)
    rows, cols = win.cells(stride)
    out[:, rows, cols] = ids
    return out


def square_novelty(window_novelty: float, window_cells: int, square_cells: int, pad: float) -> float:
    """A window's mean novelty on the whole square's scale (the grey cells at the grey square's)."""
    return (window_novelty * window_cells + pad * (square_cells - window_cells)) / square_cells
