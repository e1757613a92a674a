"""The fuzzer's seed frames and its structure-aware mutator (``palettelink fuzz``).

A seed is a real coded frame (bus.jpg / zidane.jpg through a codec's encoder, :func:`seed_frames`)
with its raw wire layout (:class:`Raw`: every header field free to hold values the format forbids).
:class:`Mutator` draws one mutation of a seed per case, deterministically for a seed and case number:
first the cut of each seed at every byte, then cuts, bit flips, zeroed words, extreme header fields,
moved, dropped or repeated layers, splices and random bytes, most of them also re-checksummed so that
the damage reaches the codec's own parser.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from palettelink import bitstream, codecs
from palettelink.image import load_image
from palettelink.samples import sample_images

# -- the raw layout of a valid frame, and a writer that accepts anything --------------------------------


@dataclass
class Raw:
    """A frame's fields as written on the wire, each free to hold values the format forbids."""

    version: int
    codec: int
    param: int
    flags: int
    bundle_id: bytes
    table_hash: bytes
    width: int
    height: int
    shapes: list[list[int]]
    layers: list[bytes]
    n_tensors: int | None = None  # None: len(shapes)
    n_layers: int | None = None  # None: len(layers)
    lengths: list[int] | None = None  # None: the layers' lengths
    bid_len: int | None = None  # None: len(bundle_id)

    @classmethod
    def parse(cls, payload: bytes) -> Raw:
        f = bitstream.unpack(payload)
        version, codec, param, flags = payload[4], payload[5], payload[6], payload[7]
        return cls(version, codec, param, flags, f.bundle_id.encode(), f.table_hash, *f.image_size,
                   [list(s) for s in f.shapes], list(f.layers))

    def copy(self) -> Raw:
        return Raw(self.version, self.codec, self.param, self.flags, self.bundle_id, self.table_hash,
                   self.width, self.height, [list(s) for s in self.shapes], list(self.layers),
                   self.n_tensors, self.n_layers, None if self.lengths is None else list(self.lengths),
                   self.bid_len)

    def header(self) -> bytes:
        def u16(v: int) -> bytes:
            return struct.pack(">H", v & 0xFFFF)

        out = bytearray(bitstream.MAGIC)
        out += bytes([self.version & 255, self.codec & 255, self.param & 255, self.flags & 255])
        out.append((len(self.bundle_id) if self.bid_len is None else self.bid_len) & 255)
        out += self.bundle_id + self.table_hash + u16(self.width) + u16(self.height)
        out.append((len(self.shapes) if self.n_tensors is None else self.n_tensors) & 255)
        for s in self.shapes:
            out += b"".join(u16(v) for v in s)
        out.append((len(self.layers) if self.n_layers is None else self.n_layers) & 255)
        for n in (self.lengths if self.lengths is not None else [len(x) for x in self.layers]):
            out += _uvarint(n)
        return bytes(out)

    def pack(self, crc: bool = True) -> bytes:
        """The frame with chained CRCs computed over what is written (``crc=False``: zero CRCs)."""
        out = bytearray(self.header())
        c = zlib.crc32(out)
        for layer in self.layers:
            c = zlib.crc32(layer, c)
            out += layer + struct.pack(">I", c if crc else 0)
        return bytes(out)


def _uvarint(n: int) -> bytes:
    """The container's varint (one implementation, in bitstream); mutated lengths may go negative."""
    return bitstream._uvarint(max(0, n))


def _spans(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Header end and each layer's (start, end) in a valid frame; its CRC follows at ``end``."""
    f = bitstream.unpack(payload)
    pos = len(payload) - sum(len(x) + bitstream.CRC_BYTES for x in f.layers)
    head, spans = pos, []
    for x in f.layers:
        spans.append((pos, pos + len(x)))
        pos += len(x) + bitstream.CRC_BYTES
    return head, spans


# -- the mutator -------------------------------------------------------------------------------------

EXTREME_U16 = (0, 1, 2, 255, 256, 16383, 16384, 16385, 32768, 65535)
EXTREME_U8 = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 254, 255)
EVERY_BYTE_UP_TO = 16384
EXTREME_LEN = (0, 1, 2, 3, 4, 5, 7, 8, 255, 4096, 1 << 20, (1 << 28) - 1, (1 << 35) - 1)


@dataclass
class Seed:
    name: str  # e.g. "palette/bus"
    codec: str
    payload: bytes
    raw: Raw = field(init=False)
    head: int = field(init=False)
    spans: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.raw = Raw.parse(self.payload)
        self.head, self.spans = _spans(self.payload)

    def cut_points(self, every: int = EVERY_BYTE_UP_TO) -> list[int]:
        """Where to cut for the systematic truncations: every byte of a frame up to ``every`` bytes; of
        a longer one every byte of its header, 16 bytes either side of each layer's start, end and CRC,
        and 256 points spread over the rest."""
        n = len(self.payload)
        if n <= every:
            return list(range(n))
        pts = set(range(self.head + 1))
        for a, e in self.spans:
            for x in (a, e, e + bitstream.CRC_BYTES):
                pts.update(range(max(0, x - 16), min(n, x + 17)))
        pts.update(range(0, n, max(1, n // 256)))
        return sorted(p for p in pts if p < n)


class Mutator:
    """Draws mutations of the seed frames; ``case(i)`` is deterministic for a given seed and ``i``.
    The first cases are the cuts of each seed frame at every byte (:meth:`Seed.cut_points`), then the
    rest are drawn at random from all the operators."""

    def __init__(self, seeds: list[Seed], seed: int = 0, every_byte: bool = True) -> None:
        if not seeds:
            raise ValueError("no seed frames")
        self.seeds = seeds
        self.seed = seed
        self.every_byte = every_byte
        self._ops: list[tuple[str, Callable[[random.Random, Seed], bytes]]] = [
            ("truncate", self._truncate), ("bitflip", self._bitflip), ("bitflip+crc", self._bitflip_crc),
            ("zero-word", self._zero_word), ("zero-last-word+crc", self._zero_last_word_crc),
            ("zero-word+crc", self._zero_word_crc), ("field-extreme", self._field_extreme),
            ("field-extreme+crc", self._field_extreme_crc), ("layers-shuffle", self._layers_raw),
            ("layers-shuffle+crc", self._layers_crc), ("splice", self._splice),
            ("layer-swap+crc", self._layer_swap_crc), ("random-layer+crc", self._random_layer_crc),
            ("garbage", self._garbage),
        ]
        self._cuts = [(s, k) for s in seeds for k in s.cut_points()] if every_byte else []

    @property
    def systematic(self) -> int:
        """How many of the first cases are the systematic cuts."""
        return len(self._cuts)

    def case(self, i: int) -> tuple[str, str, bytes]:
        """``(seed name, operator, payload)`` of case ``i``."""
        if i < len(self._cuts):  # the cuts at every byte of each seed frame: payload[:k]
            s, k = self._cuts[i]
            return s.name, "truncate-every-byte", s.payload[:k]
        rng = random.Random(f"{self.seed}:{i}")
        s = rng.choice(self.seeds)
        name, op = rng.choice(self._ops)
        return s.name, name, op(rng, s)

    # operators ------------------------------------------------------------------------------------

    def _truncate(self, rng: random.Random, s: Seed) -> bytes:
        k = rng.choice([rng.randrange(len(s.payload)), rng.randrange(s.head + 1),
                        rng.choice([e for _, e in s.spans]) + rng.randrange(-2, 5)])
        return s.payload[: max(0, k)]

    def _bitflip(self, rng: random.Random, s: Seed) -> bytes:
        b = bytearray(s.payload)
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            bit = rng.randrange(8 * len(b))
            b[bit // 8] ^= 1 << (bit % 8)
        return bytes(b)

    def _mutate_layer(self, rng: random.Random, s: Seed, fn: Callable[[bytearray], None]) -> bytes:
        r = s.raw.copy()
        i = rng.randrange(len(r.layers))
        b = bytearray(r.layers[i])
        if b:
            fn(b)
        r.layers[i] = bytes(b)
        return r.pack()

    def _bitflip_crc(self, rng: random.Random, s: Seed) -> bytes:
        def flip(b: bytearray) -> None:
            for _ in range(rng.choice((1, 1, 2, 5, 32))):
                bit = rng.randrange(8 * len(b))
                b[bit // 8] ^= 1 << (bit % 8)
        return self._mutate_layer(rng, s, flip)

    def _zero_word(self, rng: random.Random, s: Seed) -> bytes:
        b = bytearray(s.payload)
        at = rng.randrange(0, max(1, len(b) - 3))
        b[at : at + 4] = bytes(len(b[at : at + 4]))
        return bytes(b)

    def _zero_last_word_crc(self, rng: random.Random, s: Seed) -> bytes:
        def zero(b: bytearray) -> None:
            n = rng.choice((1, 2, 4, 4, 4, 8))
            b[-n:] = bytes(min(n, len(b)))
        return self._mutate_layer(rng, s, zero)

    def _zero_word_crc(self, rng: random.Random, s: Seed) -> bytes:
        def zero(b: bytearray) -> None:
            at = rng.randrange(len(b)) & ~3
            b[at : at + 4] = bytes(len(b[at : at + 4]))
        return self._mutate_layer(rng, s, zero)

    def _extreme(self, rng: random.Random, s: Seed) -> Raw:
        r = s.raw.copy()
        what = rng.choice(["version", "codec", "param", "flags", "bid_len", "width", "height", "n_tensors",
                           "shape", "n_layers", "length", "bundle_id", "table_hash"])
        if what in ("version", "codec", "param", "flags", "bid_len", "n_tensors", "n_layers"):
            n = len(r.shapes) if what == "n_tensors" else len(r.layers)
            setattr(r, what, rng.choice(EXTREME_U8 + (n + 1, max(0, n - 1))))
        elif what in ("width", "height"):
            setattr(r, what, rng.choice(EXTREME_U16))
        elif what == "shape":
            r.shapes[rng.randrange(len(r.shapes))][rng.randrange(3)] = rng.choice(EXTREME_U16)
        elif what == "length":
            r.lengths = [len(x) for x in r.layers]
            i = rng.randrange(len(r.lengths))
            r.lengths[i] = rng.choice(EXTREME_LEN + (r.lengths[i] - 1, r.lengths[i] + 1))
        elif what == "bundle_id":
            r.bundle_id = rng.choice([b"", b"x" * 64, b"x" * 65, b"\xff\xfe", r.bundle_id[:-1]])
        else:
            r.table_hash = bytes(8)
        return r

    def _field_extreme(self, rng: random.Random, s: Seed) -> bytes:
        """The new header before the original layers and CRCs (half the cases), else re-checksummed."""
        r = self._extreme(rng, s)
        out = r.pack()
        # raw: keep the original layer bytes and CRCs after the new header
        return out[: len(r.header())] + s.payload[s.head:] if rng.random() < 0.5 else out

    def _field_extreme_crc(self, rng: random.Random, s: Seed) -> bytes:
        return self._extreme(rng, s).pack()

    def _shuffled(self, rng: random.Random, n: int) -> list[int]:
        order = list(range(n))
        how = rng.choice(["reverse", "shuffle", "repeat", "drop", "dup-first", "repeat-all"])
        if how == "reverse":
            order.reverse()
        elif how == "shuffle":
            rng.shuffle(order)
        elif how == "repeat":
            i = rng.randrange(n)
            order.insert(rng.randrange(n + 1), i)
        elif how == "drop" and n > 1:
            order.pop(rng.randrange(n))
        elif how == "dup-first":
            order = [0] * rng.randrange(1, n + 2)
        else:
            order = order * 2
        return order

    def _layers_raw(self, rng: random.Random, s: Seed) -> bytes:
        """Layer+CRC blocks moved as they are (the header's lengths follow the new order or not)."""
        order = self._shuffled(rng, len(s.spans))
        blocks = [s.payload[a : e + bitstream.CRC_BYTES] for a, e in s.spans]
        r = s.raw.copy()
        r.layers = [s.raw.layers[i] for i in order]
        head = r.header() if rng.random() < 0.5 else s.payload[: s.head]
        return head + b"".join(blocks[i] for i in order)

    def _layers_crc(self, rng: random.Random, s: Seed) -> bytes:
        r = s.raw.copy()
        order = self._shuffled(rng, len(r.layers))
        r.layers = [s.raw.layers[i] for i in order]
        if rng.random() < 0.3:
            r.layers[rng.randrange(len(r.layers))] = b""
        return r.pack()

    def _splice(self, rng: random.Random, s: Seed) -> bytes:
        o = rng.choice(self.seeds)
        a, b = rng.randrange(len(s.payload) + 1), rng.randrange(len(o.payload) + 1)
        if rng.random() < 0.3:
            a, b = s.head, o.head  # header of one, layers of the other
        return s.payload[:a] + o.payload[b:]

    def _layer_swap_crc(self, rng: random.Random, s: Seed) -> bytes:
        o = rng.choice(self.seeds)
        r = s.raw.copy()
        if rng.random() < 0.5:
            r.layers = list(o.raw.layers)
        else:
            r.layers[rng.randrange(len(r.layers))] = rng.choice(o.raw.layers)
        return r.pack()

    def _random_layer_crc(self, rng: random.Random, s: Seed) -> bytes:
        r = s.raw.copy()
        i = rng.randrange(len(r.layers))
        n = rng.choice([len(r.layers[i]), rng.randrange(1, 64), rng.randrange(1, 2 * len(r.layers[i]) + 2)])
        r.layers[i] = rng.choice([rng.randbytes(n), bytes(n), b"\xff" * n])
        return r.pack()

    def _garbage(self, rng: random.Random, s: Seed) -> bytes:
        n = rng.randrange(0, 256)
        prefix = s.payload[: rng.randrange(0, s.head + 1)] if rng.random() < 0.7 else b""
        return prefix + rng.randbytes(n)


def seed_frames(bundle: Any, names: list[str] | None = None, big: bool = True) -> list[Seed]:
    """bus.jpg and zidane.jpg through every codec of ``bundle``: its coarsest, a middle and the finest
    level for the progressive palette codec (1..L layers); levels 2 and 8 of the others: 2 and 8 bits
    for the baseline (``big=False``: 2 bits only, 160 KB frames instead of 1 MB, for quick runs), AVIF
    q30 and q20 of the picture at a quarter size (``big=False``: q30 only)."""
    out = []
    for codec in names or codecs.available(bundle):
        enc, spec = codecs.make_encoder(bundle, codec), codecs.spec(codec)
        levels = enc.levels()
        pick = sorted({levels[0], levels[len(levels) // 2], levels[-1]}) if spec.progressive \
            else [lv for lv in levels if lv in ((2, 8) if big else (2,))] or levels[-1:]
        for p in sample_images():
            a = enc.analyse(load_image(p))
            for lv in pick:
                out.append(Seed(f"{codec}/{p.stem}/{spec.level_label(lv)}", codec,
                                enc.encode_analysis(a, lv).payload))
    return out
