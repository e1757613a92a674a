"""Integer-table entropy coding: exact round trips, exact tables, corrupt data detected."""

from __future__ import annotations

import numpy as np
import pytest

from palettelink import entropy
from palettelink.errors import InvalidStream


def test_normalise_counts_sums_exactly_and_keeps_every_symbol() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 1000, size=rng.integers(2, 300))
        t = entropy.normalise_counts(counts)
        assert t.sum() == 1 << entropy.PROB_BITS
        assert (t >= 1).all()


def test_normalise_counts_is_proportional() -> None:
    t = entropy.normalise_counts(np.array([1, 1, 2]))
    assert abs(int(t[2]) - 2 * int(t[0])) <= 2


def test_round_trip_single_table() -> None:
    rng = np.random.default_rng(1)
    sym = rng.choice(8, size=5000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01])
    table = entropy.normalise_counts(np.bincount(sym, minlength=8))
    data = entropy.encode(sym, table)
    assert (entropy.decode(data, sym.size, table) == sym).all()
    ideal = -np.log2(np.bincount(sym, minlength=8)[sym] / sym.size).sum() / 8
    assert len(data) < ideal * 1.02 + 8


def test_round_trip_rows() -> None:
    rng = np.random.default_rng(2)
    tables = entropy.normalise_counts(rng.integers(0, 50, size=(1000, 6)))
    sym = np.array([rng.choice(6, p=t / t.sum()) for t in tables])
    data = entropy.encode_rows(sym, tables)
    assert (entropy.decode_rows(data, tables) == sym).all()


def test_corrupt_words_are_detected() -> None:
    table = entropy.normalise_counts(np.array([10, 10, 10, 10]))
    sym = np.arange(400) % 4
    data = bytearray(entropy.encode(sym, table))
    data[0] ^= 0xFF
    with pytest.raises(InvalidStream):
        entropy.decode(bytes(data), sym.size, table)
    with pytest.raises(InvalidStream, match="whole number"):
        entropy.decode(bytes(data[:-1]), sym.size, table)


def test_uvarints() -> None:
    vals = np.array([0, 1, 127, 128, 65536, 2**30])
    data = entropy.encode_uvarints(vals)
    out, pos = entropy.decode_uvarints(data + b"tail", len(vals))
    assert (out == vals).all() and pos == len(data)
    with pytest.raises(InvalidStream):
        entropy.decode_uvarints(data[:-1], len(vals))
