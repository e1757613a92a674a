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


def test_a_zero_last_word_is_invalid_stream_not_a_bare_value_error() -> None:
    """constriction refuses such words with ``ValueError`` when the decoder is built; the coder's edge
    must turn that into the typed error, for both the single-table and the row decoder."""
    table = entropy.normalise_counts(np.array([10, 10, 10, 10]))
    sym = np.arange(400) % 4
    data = entropy.encode(sym, table)
    assert data[-4:] != bytes(4)  # an encoder never writes one
    bad = data[:-4] + bytes(4)
    with pytest.raises(InvalidStream, match="zero word"):
        entropy.decode(bad, sym.size, table)
    tables = np.repeat(table[None], sym.size, axis=0)
    with pytest.raises(InvalidStream, match="zero word"):
        entropy.decode_rows(bad, tables)
    with pytest.raises(InvalidStream, match="zero word"):
        entropy.RowDecoder(bytes(8))
    assert (entropy.decode(data, sym.size, table) == sym).all()  # the good words still decode


def test_damaged_words_give_the_typed_error_or_symbols_never_another_exception() -> None:
    """Cut at every word, every word zeroed, junk words: constriction either refuses (→ InvalidStream)
    or decodes past the end of its words, which ANS cannot always tell from a clean end (a cut stream
    can decode to trailing zeros: catching that is the job of a checksum over the frame)."""
    rng = np.random.default_rng(3)
    table = entropy.normalise_counts(np.array([40, 10, 5, 1, 1, 1]))
    sym = rng.choice(6, size=600, p=[0.6, 0.2, 0.1, 0.05, 0.03, 0.02])
    data = entropy.encode(sym, table)
    tables = np.repeat(table[None], sym.size, axis=0)
    words = len(data) // 4
    variants = [data[: 4 * k] for k in range(words)]
    variants += [data[: 4 * k] + bytes(4) + data[4 * k + 4:] for k in range(words)]
    variants += [rng.bytes(4 * rng.integers(1, 2 * words)) for _ in range(50)]
    decoders = (lambda b: entropy.decode(b, sym.size, table), lambda b: entropy.decode_rows(b, tables))
    refused = 0
    for bad in variants:
        for decode in decoders:
            try:
                out = decode(bad)
            except InvalidStream:
                refused += 1
                continue
            assert out.shape == sym.shape and out.dtype == np.int32
    assert refused >= len(variants)  # most are refused outright
