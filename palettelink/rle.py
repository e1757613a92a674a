"""Run-length masks as the wire carries them: row-major, alternating runs starting with zeros
(the first count may be 0). COCO's uncompressed RLE is the same idea in column-major order."""

from __future__ import annotations

import numpy as np

from palettelink.errors import InvalidStream


def encode(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, bool).reshape(-1)
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] if flat[0] else []) + [int(r) for r in runs]


def decode(counts: list[int] | tuple[int, ...], width: int, height: int) -> np.ndarray:
    """The HxW bool mask; InvalidStream when the runs do not cover it exactly."""
    runs = np.asarray(counts, np.int64)
    if (runs < 0).any() or int(runs.sum()) != width * height:
        raise InvalidStream(f"mask runs cover {int(runs.sum())} pixels, not {width}x{height}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(height, width)
