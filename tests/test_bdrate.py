"""BD-rate says "x % of the bits for the same accuracy", and refuses curves that never overlap."""

from __future__ import annotations

import numpy as np
import pytest

from palettelink.bench.bdrate import bd_rate, pareto


def test_half_the_rate_everywhere_is_minus_50_percent() -> None:
    q = [0.5, 0.7, 0.85, 0.95]
    r = [0.2, 0.4, 0.8, 1.6]
    assert bd_rate(r, q, np.array(r) / 2, q) == pytest.approx(-50.0, abs=1e-6)


def test_same_curve_is_zero_and_symmetry() -> None:
    q, r = [0.3, 0.6, 0.9], [0.1, 0.3, 1.0]
    assert bd_rate(r, q, r, q) == pytest.approx(0.0, abs=1e-9)
    up = bd_rate(r, q, np.array(r) * 4, q)
    assert up == pytest.approx(300.0, abs=1e-6)


def test_no_overlap_is_none() -> None:
    assert bd_rate([0.1, 0.2], [0.1, 0.2], [0.3, 0.4], [0.5, 0.6]) is None
    assert bd_rate([0.1], [0.5], [0.1, 0.2], [0.4, 0.6]) is None


def test_pareto_drops_dominated_points() -> None:
    r, q = pareto([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.7, 0.7])
    assert r.tolist() == [0.1, 0.3] and q.tolist() == [0.5, 0.7]
