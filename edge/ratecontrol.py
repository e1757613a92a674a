"""Rate control on the edge: the core's module (:mod:`palettelink.ratecontrol`) under its old name."""

from palettelink.ratecontrol import (
    Choice,
    Coded,
    FixedLevel,
    LevelCoder,
    RateController,
    StreamBudget,
    TargetBpp,
    TargetBytes,
    controller_from,
)

__all__ = ["Choice", "Coded", "FixedLevel", "LevelCoder", "RateController", "StreamBudget", "TargetBpp",
           "TargetBytes", "controller_from"]
