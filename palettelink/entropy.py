"""Entropy coding over integer frequency tables, with ``constriction``'s ANS coder.

Every model that reaches the coder is an *integer* table (frozen in a bundle, or sent in the stream).
It is turned into float64 probabilities by one exact IEEE division per entry, which every machine
computes identically, and constriction's fixed-point quantisation of those floats is deterministic.
So encoder and decoder agree bit-exactly on any machine (the failure CompressAI users hit when float
CDFs are recomputed on another device cannot happen here).
"""

from __future__ import annotations

import constriction
import numpy as np

from palettelink.errors import InvalidStream

Categorical = constriction.stream.model.Categorical
AnsCoder = constriction.stream.stack.AnsCoder

PROB_BITS = 16  # integer tables are normalised to sum to 2**16 before use
_ROW_MODEL = Categorical(perfect=False)
ROW_MODEL = _ROW_MODEL  # the model of row-coded streams: each symbol's probabilities come with it


def normalise_counts(counts: np.ndarray, total: int = 1 << PROB_BITS, floor: int = 1) -> np.ndarray:
    """Integer frequencies summing exactly to ``total`` along the last axis, each ≥ ``floor``.

    Deterministic integer arithmetic only (largest-remainder rounding), so a table computed from
    the same counts is the same everywhere.
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim == 1:
        return normalise_counts(c[None], total, floor)[0]
    n = c.shape[-1]
    budget = total - floor * n
    if budget < 0:
        raise ValueError("alphabet too large for the table precision")
    c = np.where(c.sum(axis=-1, keepdims=True) == 0, 1, c)
    s = c.sum(axis=-1, keepdims=True)
    scaled = c * budget
    base = scaled // s
    rem = scaled - base * s
    short = budget - base.sum(axis=-1)
    order = np.argsort(-rem, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    base = base + (rank < short[..., None])
    return base + floor


def _probs(table: np.ndarray) -> np.ndarray:
    t = np.asarray(table, dtype=np.float64)
    return t / t.sum(axis=-1, keepdims=True)


def _to_bytes(words: np.ndarray) -> bytes:
    return np.asarray(words, dtype="<u4").tobytes()


words_to_bytes = _to_bytes  # an AnsCoder's compressed words as the bytes a layer carries


def _from_bytes(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise InvalidStream(f"entropy-coded layer of {len(data)} bytes is not a whole number of words")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def _decoder(data: bytes) -> AnsCoder:
    """An ANS decoder over client bytes: the one place where those bytes enter constriction.

    Every way constriction refuses them becomes :class:`InvalidStream`, never a bare ``ValueError``
    (an encoder never writes a zero last word, so constriction refuses such a stream outright).
    """
    words = _from_bytes(data)
    if words.size and words[-1] == 0:
        raise InvalidStream("entropy-coded layer ends in a zero word, which no encoder writes (corrupt)")
    try:
        return AnsCoder(words)
    except Exception as e:  # noqa: BLE001 - constriction's own refusal of junk words
        raise InvalidStream(f"not a valid entropy-coded stream: {e}") from e


def _decode_from(coder: AnsCoder, *args: object) -> np.ndarray:
    """``coder.decode(*args)`` with constriction's refusals turned into :class:`InvalidStream`."""
    try:
        out = coder.decode(*args)
    except Exception as e:  # noqa: BLE001 - constriction rejects some junk words itself
        raise InvalidStream(f"not a valid entropy-coded stream: {e}") from e
    return np.asarray(out, dtype=np.int32)


def encode(symbols: np.ndarray, table: np.ndarray) -> bytes:
    """Code i.i.d. ``symbols`` under one integer ``table`` (1-D frequencies)."""
    coder = AnsCoder()
    sym = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
    if sym.size:
        coder.encode_reverse(sym, Categorical(_probs(table), perfect=False))
    return _to_bytes(coder.get_compressed())


def decode(data: bytes, n: int, table: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode`; raises :class:`InvalidStream` unless the layer is consumed exactly."""
    coder = _decoder(data)
    out = _decode_from(coder, Categorical(_probs(table), perfect=False), n) if n else np.zeros(0, np.int32)
    if not coder.is_empty():
        raise InvalidStream("entropy-coded layer does not decode cleanly (corrupt or wrong model)")
    return out


class RowEncoder:
    """One ANS stream holding several segments; every symbol is coded under its own integer table row.

    Segments are decoded in the order they were added, so the tables of a later segment may depend on
    the symbols of earlier ones (context models that decode in passes). One flush per stream.
    """

    def __init__(self) -> None:
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, symbols: np.ndarray, tables: np.ndarray) -> None:
        sym = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
        if sym.size:
            self._segments.append((sym, tables))

    def to_bytes(self) -> bytes:
        coder = AnsCoder()
        for sym, tables in reversed(self._segments):  # a stack: the last segment goes in first
            coder.encode_reverse(sym, _ROW_MODEL, _probs(tables))
        return _to_bytes(coder.get_compressed())


class RowDecoder:
    """Inverse of :class:`RowEncoder`: :meth:`take` each segment in order, then :meth:`finish`."""

    def __init__(self, data: bytes) -> None:
        self._coder = _decoder(data)

    def take(self, tables: np.ndarray) -> np.ndarray:
        if not len(tables):
            return np.zeros(0, np.int32)
        return _decode_from(self._coder, _ROW_MODEL, _probs(tables))

    def take_probs(self, probs: np.ndarray) -> np.ndarray:
        """:meth:`take` with each row's probabilities given (float64, rows summing to 1, exactly what
        :meth:`take` derives from integer tables)."""
        if not len(probs):
            return np.zeros(0, np.int32)
        return _decode_from(self._coder, _ROW_MODEL, probs)

    def finish(self) -> None:
        if not self._coder.is_empty():
            raise InvalidStream("entropy-coded layer does not decode cleanly (corrupt or wrong model)")


def encode_rows(symbols: np.ndarray, tables: np.ndarray) -> bytes:
    """Code ``symbols[i]`` under its own integer table ``tables[i]`` (context-adaptive models)."""
    enc = RowEncoder()
    enc.add(symbols, tables)
    return enc.to_bytes()


def decode_rows(data: bytes, tables: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_rows`."""
    dec = RowDecoder(data)
    out = dec.take(tables)
    dec.finish()
    return out


def encode_uvarints(values: np.ndarray) -> bytes:
    """Small side information (histograms) as LEB128 unsigned varints."""
    out = bytearray()
    for v in np.asarray(values, dtype=np.int64).ravel().tolist():
        if v < 0:
            raise ValueError("uvarint values must be ≥ 0")
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def decode_uvarints(data: bytes, n: int, offset: int = 0) -> tuple[np.ndarray, int]:
    """Read ``n`` uvarints from ``data[offset:]``; returns (values, new offset)."""
    vals = []
    pos = offset
    for _ in range(n):
        v, shift = 0, 0
        while True:
            if pos >= len(data) or shift > 35:
                raise InvalidStream("truncated or malformed side information")
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        vals.append(v)
    return np.asarray(vals, dtype=np.int64), pos
