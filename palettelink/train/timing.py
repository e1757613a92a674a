"""Timing for the int8 measurements: the median of repeated calls after one warm-up call (the first
run of an onnxruntime session allocates and plans; later runs are what a stream pays)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[[], Any], n: int = 7, digits: int = 2) -> float:
    """Median wall milliseconds of ``n`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), digits)
