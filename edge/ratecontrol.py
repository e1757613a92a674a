"""Rate control on the edge: the seam between a controller and an encoder.

The controllers themselves live in the core (:mod:`palettelink.ratecontrol`: fixed level, target
bytes/bpp, a kbps/fps leaky bucket); they choose a level from the coded size of every level. This
module gets those sizes as cheaply as the encoder allows and returns the frame to send:

- a fixed level (``--bits``/``--level``) encodes that one level only: no extra cost;
- an encoder with ``analyse`` / ``level_sizes`` / ``encode_analysis`` (the palette codec: one
  progressive encode gives the exact size of every level) is run once, then cut at the chosen level;
- an encoder with ``encode_tensors`` (the baseline) runs its front once and codes each level;
- any other encoder is run once per level (correct, slow).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from palettelink.codecs import EdgeEncoder, Encoded
from palettelink.errors import InvalidRequest
from palettelink.ratecontrol import Choice, FixedLevel, RateController, StreamBudget, TargetBpp, TargetBytes

__all__ = ["Choice", "FixedLevel", "LevelCoder", "RateController", "StreamBudget", "TargetBpp",
           "TargetBytes", "controller_from"]


def controller_from(level: int | None = None, target_bpp: float | None = None,
                    target_bytes: int | None = None, kbps: float | None = None,
                    fps: float | None = None) -> RateController | None:
    """The controller the command line asks for; ``None`` means the codec's default level."""
    asked = [n for n, v in (("--bits/--level", level), ("--target-bpp", target_bpp),
                            ("--target-bytes", target_bytes), ("--kbps", kbps)) if v is not None]
    if len(asked) > 1:
        raise InvalidRequest(f"choose one way to set the rate, not {' and '.join(asked)}")
    if (kbps is None) != (fps is None):
        raise InvalidRequest("--kbps and --fps go together")
    if level is not None:
        return FixedLevel(level)
    if target_bpp is not None:
        return TargetBpp(target_bpp)
    if target_bytes is not None:
        return TargetBytes(target_bytes)
    if kbps is not None and fps is not None:
        return StreamBudget(kbps, fps)
    return None


@dataclass
class Coded:
    encoded: Encoded
    choice: Choice | None  # None when the codec's default level was used


class LevelCoder:
    """Encode one frame at the level ``controller`` picks."""

    def __init__(self, encoder: EdgeEncoder, controller: RateController | None) -> None:
        self.encoder = encoder
        self.controller = controller
        self.levels: Sequence[int] = encoder.levels()
        if isinstance(controller, FixedLevel) and controller.level not in self.levels:
            raise InvalidRequest(f"level {controller.level} is not offered by the {encoder.codec} codec; "
                                 f"its levels are {sorted(self.levels)}")

    def encode(self, rgb: np.ndarray) -> Coded:
        c = self.controller
        if c is None:
            return Coded(self.encoder.encode(rgb, None), None)
        if isinstance(c, FixedLevel):
            fixed = self.encoder.encode(rgb, c.level)
            return Coded(fixed, Choice(c.level, len(fixed.payload)))
        enc = self.encoder
        analyse = getattr(enc, "analyse", None)
        level_sizes = getattr(enc, "level_sizes", None)
        encode_analysis = getattr(enc, "encode_analysis", None)
        if analyse is not None and level_sizes is not None and encode_analysis is not None:
            analysis = analyse(rgb)
            choice = c.choose(dict(level_sizes(analysis)), analysis.image_size)
            return Coded(encode_analysis(analysis, choice.level), choice)
        by_level = self.encode_all(rgb)
        any_enc = next(iter(by_level.values()))
        choice = c.choose({lv: len(e.payload) for lv, e in by_level.items()}, any_enc.image_size)
        return Coded(by_level[choice.level], choice)

    def encode_all(self, rgb: np.ndarray) -> dict[int, Encoded]:
        """Every level of one frame; timings of the chosen frame include the work for all of them."""
        enc = self.encoder
        analyse = getattr(enc, "analyse", None)
        encode_analysis = getattr(enc, "encode_analysis", None)
        if analyse is not None and encode_analysis is not None:
            analysis = analyse(rgb)
            return {lv: encode_analysis(analysis, lv) for lv in self.levels}
        front = getattr(enc, "front", None)
        encode_tensors = getattr(enc, "encode_tensors", None)
        if front is not None and encode_tensors is not None:
            tensors, info, front_ms = front.run(rgb)
            size = (info.width, info.height)
            t0 = time.perf_counter()
            payloads = {lv: encode_tensors(tensors, size, lv) for lv in self.levels}
            enc_ms = (time.perf_counter() - t0) * 1e3
            return {lv: Encoded(p, enc.codec, lv, size, {"front_ms": front_ms, "encode_ms": enc_ms})
                    for lv, p in payloads.items()}
        return {lv: enc.encode(rgb, lv) for lv in self.levels}
