"""Bjøntegaard delta rate between two rate–accuracy curves (VCEG-M33, with the piecewise-cubic
interpolation that JVET's CTC reports use instead of the original cubic fit).

Accuracy (AP50) plays the role of PSNR: for each curve, log-rate is interpolated as a function of
accuracy, and the mean log-rate gap over the accuracy range both curves cover gives the average
rate change at equal accuracy. −75 % means a quarter of the anchor's bits for the same AP50.
Curves are first reduced to their Pareto front (a point that costs more bits for less accuracy than
another one says nothing about the trade-off), since AP of a codec is not always monotone in rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator


def pareto(rates: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points not dominated by a cheaper-and-better one, sorted by rate (quality then increases)."""
    r = np.asarray(rates, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    order = np.lexsort((-q, r))
    keep_r, keep_q, best = [], [], -np.inf
    for i in order:
        if q[i] > best + 1e-12 and r[i] > 0:
            keep_r.append(r[i])
            keep_q.append(q[i])
            best = q[i]
    return np.asarray(keep_r), np.asarray(keep_q)


def bd_rate(anchor_rate: Sequence[float], anchor_q: Sequence[float], test_rate: Sequence[float],
            test_q: Sequence[float], samples: int = 1000) -> float | None:
    """Average rate difference of ``test`` vs ``anchor`` in percent; None without a common range."""
    ra, qa = pareto(anchor_rate, anchor_q)
    rt, qt = pareto(test_rate, test_q)
    if len(ra) < 2 or len(rt) < 2:
        return None
    lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    if hi - lo <= 1e-9:
        return None
    grid = np.linspace(lo, hi, samples)
    la = PchipInterpolator(qa, np.log10(ra))(grid)
    lt = PchipInterpolator(qt, np.log10(rt))(grid)
    avg = float(np.trapezoid(lt - la, grid) / (hi - lo))
    return (10.0**avg - 1.0) * 100.0
