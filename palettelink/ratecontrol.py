"""Rate control: pick, per frame, the finest level that fits, and code the frame at it.

Controllers (fixed level, target bytes/bpp, a kbps/fps leaky bucket) choose from the coded size of
every level; :class:`LevelCoder` gets those sizes as the codec's registry spec allows. A codec with
``exact_sizes`` (all today: the palette cuts one progressive encode, the baseline codes each bit
depth from one front run, the avif codec codes the picture at each level) is analysed once, sized,
and cut at the chosen level; any other codec has every level coded from one analysis and the
fitting one sent. Control is exact, not a model of the rate. Controllers look at sizes only, so
what a level number means (palette: 0 is finest; baseline: bits, more is finer) does not matter to
them.

A budget below the coarsest level is not an error: the coarsest level is sent and the choice carries
a warning (a camera must keep streaming; the operator sees the warning and the over-budget bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from palettelink import codecs
from palettelink.codecs import EdgeEncoder, Encoded
from palettelink.errors import InvalidRequest


@dataclass(frozen=True)
class Choice:
    level: int
    n_bytes: int
    warning: str | None = None


class RateController(Protocol):
    def choose(self, sizes: dict[int, int], image_size: tuple[int, int]) -> Choice: ...


def finest_within(sizes: dict[int, int], budget: float) -> Choice:
    """The largest coded size ≤ budget; else the smallest, with a warning."""
    if not sizes:
        raise InvalidRequest("no levels to choose from")
    fitting = [(n, lvl) for lvl, n in sizes.items() if n <= budget]
    if fitting:
        n, lvl = max(fitting)
        return Choice(lvl, n)
    n, lvl = min((n, lvl) for lvl, n in sizes.items())
    return Choice(lvl, n, f"budget {budget:.0f} B is below the coarsest level ({n} B): sent level {lvl}")


@dataclass
class FixedLevel:
    level: int

    def choose(self, sizes: dict[int, int], image_size: tuple[int, int]) -> Choice:
        if self.level not in sizes:
            raise InvalidRequest(f"level {self.level} is not one of {sorted(sizes)}")
        return Choice(self.level, sizes[self.level])


@dataclass
class TargetBytes:
    n_bytes: int

    def __post_init__(self) -> None:
        if self.n_bytes <= 0:
            raise InvalidRequest("--target-bytes must be positive")

    def choose(self, sizes: dict[int, int], image_size: tuple[int, int]) -> Choice:
        return finest_within(sizes, self.n_bytes)


@dataclass
class TargetBpp:
    bpp: float

    def __post_init__(self) -> None:
        if not self.bpp > 0:
            raise InvalidRequest("--target-bpp must be positive")

    def choose(self, sizes: dict[int, int], image_size: tuple[int, int]) -> Choice:
        w, h = image_size
        return finest_within(sizes, self.bpp * w * h / 8.0)


@dataclass
class StreamBudget:
    """A leaky bucket for ``kbps`` at ``fps``: unspent bytes carry over (up to ``burst_s`` seconds).

    Frames that are cheap to code (static scenes) leave budget for the busy ones: the content decides
    the level, frame by frame.
    """

    kbps: float
    fps: float
    burst_s: float = 1.0
    credit: float = 0.0

    def __post_init__(self) -> None:
        if not (self.kbps > 0 and self.fps > 0):
            raise InvalidRequest("--kbps and --fps must be positive")

    @property
    def per_frame(self) -> float:
        return self.kbps * 1000.0 / 8.0 / self.fps

    def choose(self, sizes: dict[int, int], image_size: tuple[int, int]) -> Choice:
        budget = self.per_frame + self.credit
        choice = finest_within(sizes, budget)
        self.credit = min(budget - choice.n_bytes, self.per_frame * self.fps * self.burst_s)
        return choice


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


def all_levels(encoder: EdgeEncoder) -> list[int]:
    """Every level ``encoder`` can code (a palette can cut levels its bundle does not offer)."""
    every = getattr(encoder, "all_levels", None)
    return list(every()) if every is not None else list(encoder.levels())


def not_offered_warning(encoder: EdgeEncoder, level: int) -> str:
    return (f"level {level} is not one the bundle offers (it measured worse than a coarser level or "
            f"fired more false boxes than AVIF q0 at training); offered: {sorted(encoder.levels())}")


@dataclass
class Coded:
    encoded: Encoded
    choice: Choice | None  # None when the codec's default level was used


class LevelCoder:
    """Encode one frame at the level ``controller`` picks, through the one encoder interface."""

    def __init__(self, encoder: EdgeEncoder, controller: RateController | None) -> None:
        self.encoder = encoder
        self.controller = controller
        self.spec = codecs.spec(encoder.codec)
        self.levels: list[int] = encoder.levels()
        self.fixed_warning: str | None = None
        if isinstance(controller, FixedLevel) and controller.level not in self.levels:
            if controller.level not in all_levels(encoder):
                raise InvalidRequest(f"level {controller.level} is not offered by the {encoder.codec} codec; "
                                     f"its levels are {sorted(self.levels)}")
            self.fixed_warning = not_offered_warning(encoder, controller.level)

    def encode(self, rgb: np.ndarray) -> Coded:
        """Code one frame. A frame whose novelty is above the codec's calibrated threshold falls back
        to the finest offered level (with no controller or a fixed level; a byte budget stays a hard
        limit, so there the record only says the frame is novel); ``Encoded.fallback`` says so."""
        c = self.controller
        analysis = self.encoder.analyse(rgb)
        if c is None or isinstance(c, FixedLevel):  # one level only: no sizing cost
            level = None if c is None else c.level
            coded = self._novel(analysis, self.encoder.encode_analysis(analysis, level), may_refine=True)
            return Coded(coded, None if c is None else Choice(coded.level, len(coded.payload)))
        if self.spec.exact_sizes:
            choice = c.choose(self.encoder.level_sizes(analysis), analysis.image_size)
            coded = self.encoder.encode_analysis(analysis, choice.level)
        else:
            every = self._every_level(analysis)
            choice = c.choose({lv: len(e.payload) for lv, e in every.items()}, analysis.image_size)
            coded = every[choice.level]
        return Coded(self._novel(analysis, coded, may_refine=False), choice)

    def _novel(self, analysis: codecs.Analysis, coded: Encoded, may_refine: bool) -> Encoded:
        novelty = getattr(analysis, "novelty", None)
        threshold_of = getattr(self.encoder, "novelty_threshold", None)
        threshold = threshold_of() if threshold_of is not None else None
        if novelty is None or threshold is None or novelty <= threshold:
            return coded
        why = f"novel frame (novelty {novelty:.3g} > threshold {threshold:.3g})"
        finest = self.levels[0]
        if coded.level == finest:
            return replace(coded, fallback=f"{why}: already at the finest offered level {finest}")
        if not may_refine:
            return replace(coded, fallback=f"{why}: the byte budget allows no finer level")
        finer = self.encoder.encode_analysis(analysis, finest)
        return replace(finer, fallback=f"{why}: level {coded.level} → {finest}")

    def encode_all(self, rgb: np.ndarray) -> dict[int, Encoded]:
        """Every level of one frame, from one analysis."""
        return self._every_level(self.encoder.analyse(rgb))

    def _every_level(self, analysis: codecs.Analysis) -> dict[int, Encoded]:
        return {lv: self.encoder.encode_analysis(analysis, lv) for lv in self.levels}
