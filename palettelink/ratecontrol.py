"""Rate control over the levels of one bundle: pick, per frame, the finest level that fits.

The palette encoder knows the exact size of every level before it sends anything (one progressive
encode gives every prefix size), so control is exact, not a model of the rate. Levels: 0 is the
finest; sizes strictly decrease as the level rises. For the baseline codec the "levels" are bit
depths, where larger means finer: controllers only look at the sizes, so they serve both.

A budget below the coarsest level is not an error: the coarsest level is sent and the choice carries
a warning (a camera must keep streaming; the operator sees the warning and the over-budget bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
