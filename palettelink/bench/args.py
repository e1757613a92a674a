"""Argument types the bench commands share: comma-separated lists (``--levels 0,2,4``,
``--kbps 50,100``), so every command says the same thing about a malformed one."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def _numbers(text: str, kind: Callable[[str], N], what: str) -> list[N]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from e


def ints(text: str) -> list[int]:
    return _numbers(text, int, "integers")


def floats(text: str) -> list[float]:
    return _numbers(text, float, "numbers")


def positive_ints(text: str) -> list[int]:
    out = ints(text)
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers ≥ 1, got {text!r}")
    return out
