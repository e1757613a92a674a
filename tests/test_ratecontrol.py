"""Rate control picks the finest level that fits, and never stops a stream for a tight budget."""

from __future__ import annotations

import pytest

from palettelink.errors import InvalidRequest
from palettelink.ratecontrol import FixedLevel, StreamBudget, TargetBpp, TargetBytes

SIZES = {0: 4000, 1: 2500, 2: 1500, 3: 900, 4: 500}


def test_target_bytes_picks_finest_fitting() -> None:
    assert TargetBytes(2000).choose(SIZES, (640, 480)).level == 2
    assert TargetBytes(4000).choose(SIZES, (640, 480)).level == 0


def test_target_below_coarsest_sends_coarsest_with_warning() -> None:
    c = TargetBytes(100).choose(SIZES, (640, 480))
    assert c.level == 4 and c.warning and "below the coarsest" in c.warning


def test_target_bpp_uses_original_pixels() -> None:
    # 0.05 bpp of 640x480 = 1920 bytes → level 2 (1500 B)
    assert TargetBpp(0.05).choose(SIZES, (640, 480)).level == 2


def test_fixed_level_rejects_unknown() -> None:
    assert FixedLevel(3).choose(SIZES, (1, 1)).n_bytes == 900
    with pytest.raises(InvalidRequest):
        FixedLevel(9).choose(SIZES, (1, 1))


def test_stream_budget_carries_unspent_bytes() -> None:
    rc = StreamBudget(kbps=80, fps=10)  # 1000 bytes per frame
    cheap = {0: 600, 1: 300}
    busy = {0: 1700, 1: 1200, 2: 800}
    assert rc.choose(cheap, (1, 1)).level == 0  # spends 600, keeps 400
    assert rc.choose(busy, (1, 1)).level == 1  # 1400 available → 1200
    total = 0
    for _ in range(100):
        total += rc.choose(busy, (1, 1)).n_bytes
    assert total <= 100 * 1000 + 1000  # long-run rate respected within one second of burst


def test_bad_parameters() -> None:
    for make in (lambda: TargetBpp(0), lambda: TargetBytes(-1), lambda: StreamBudget(0, 10)):
        with pytest.raises(InvalidRequest):
            make()
