"""``palettelink fuzz``: a structure-aware mutator over real coded frames of every codec a bundle offers.

Each case is one mutation of a real frame (bus.jpg / zidane.jpg through each codec's encoder): a cut
at a byte, bit flips, zeroed 32-bit words (a layer's last word above all: constriction refuses ANS data
ending in a zero word), header fields (version, codec, param, flags, bundle id length, image size,
tensor count and shapes, layer count and lengths) set to extremes, layers dropped, emptied, reordered,
repeated or taken from the other image or codec, splices of two frames at random offsets and random
bytes in a layer. Most mutations come twice: as raw damage (the chained CRC-32 must refuse it) and
re-checksummed, so the damage reaches the codec's own parser and decoder.

A case is decoded in-process through :class:`palettelink.codecs.Decoder` (what the server runs on the
bytes of a client) or, with ``--server``, sent with the gRPC Analyze call to a real server. Its outcome
is ``ok`` (decoded), the typed error's status (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, …) or a
crash: any exception outside the :class:`~palettelink.errors.PaletteLinkError` family in-process, an
INTERNAL or UNKNOWN status from a server. A case running past ``--time-limit`` is a hang. Exit 1 when
there is any crash or hang.

In-process, a mutated frame that parses to a container already decoded (e.g. two cuts inside the same
layer of a progressive frame) reuses that outcome: the decode after parsing depends on the parsed frame
only. ``--skip-network`` (for quick runs) also stops the palette decoder before its decoder network,
which sees index maps the codec already validated, never client bytes, and the avif decoder once the
picture is decoded, before the bundle's front (which sees a checked picture of the frame's size).
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import struct
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palettelink import bitstream, codecs
from palettelink.errors import PaletteLinkError

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


# -- targets -----------------------------------------------------------------------------------------


class InProcess:
    """``Decoder.decode`` (the server's entry for client bytes); outcomes of repeated frames cached."""

    def __init__(self, bundle: Any, skip_network: bool = False, cache: bool = True) -> None:
        from palettelink.codecs import Decoder

        overrides = {}
        if skip_network and "palette" in _available(bundle):
            from palettelink.codecs import Decoded, spec

            real = spec("palette").decoder(bundle)

            class NoNetwork:
                codec = "palette"

                def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
                    r = real.decode_indices(frame)
                    real.tables.dequantise(r.indices, r.level)
                    return Decoded([], "palette", r.sent_level, frame.image_size, n_bytes, frame.truncated)

            overrides["palette"] = NoNetwork()
        if skip_network and "avif" in _available(bundle):
            from palettelink.codecs import Decoded, spec

            avif = spec("avif").decoder(bundle)

            class NoFront:
                codec = "avif"

                def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
                    avif.picture(frame)  # type: ignore[attr-defined]
                    return Decoded([], "avif", frame.param, frame.image_size, n_bytes)

            overrides["avif"] = NoFront()
        self.decoder = Decoder(bundle, overrides)
        self.cache: dict[bitstream.Frame, str] | None = {} if cache else None
        self.cached = 0

    def __call__(self, payload: bytes) -> str:
        key = None
        if self.cache is not None:
            try:
                key = codecs.unpack(payload, allow_truncated_layers=True)  # unknown codec ids: no key
            except PaletteLinkError:
                key = None
            if key is not None and key in self.cache:
                self.cached += 1
                return self.cache[key]
        try:
            self.decoder.decode(payload)
            out = "ok"
        except PaletteLinkError as e:
            out = e.code
        if key is not None:
            self.cache[key] = out  # type: ignore[index]
        return out


def _available(bundle: Any) -> list[str]:
    from palettelink.codecs import available

    return available(bundle)


class Crash(Exception):
    pass


class OverGrpc:
    """The gRPC Analyze call of a real server; INTERNAL and UNKNOWN are crashes."""

    def __init__(self, address: str, bundle: str, token: str | None = None, timeout: float = 30.0) -> None:
        import grpc

        from palettelink.v1 import palettelink_pb2 as pb
        from palettelink.v1 import palettelink_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.PaletteLinkStub(self.channel)
        self.bundle, self.timeout = bundle, timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __call__(self, payload: bytes) -> str:
        grpc = self.grpc
        for attempt in range(20):
            try:
                r = self.stub.Analyze(self.pb.AnalyzeRequest(bundle=self.bundle, payload=payload),
                                      timeout=self.timeout, metadata=self.metadata).result
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 19:
                    time.sleep(0.05 * (attempt + 1))  # the server's Analyze cap: wait and send again
                    continue
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    raise Crash(f"{code.name}: {e.details()}") from None  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return "hang"
                return code.name
            if r.HasField("error"):
                if r.error.status in ("INTERNAL", "UNKNOWN"):
                    raise Crash(f"{r.error.status}: {r.error.message}")
                return r.error.status
            return "ok"
        return "RESOURCE_EXHAUSTED"

    def close(self) -> None:
        self.channel.close()


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Report:
    cases: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    histogram: Counter[str] = field(default_factory=Counter)
    by_operator: dict[str, Counter[str]] = field(default_factory=dict)
    slowest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    target: str = "in-process"

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "crashes": len(self.crashes), "hangs": len(self.hangs),
                "histogram": dict(self.histogram.most_common()), "slowest": self.slowest,
                "seconds": round(self.seconds, 2),
                "cases_per_s": round(self.cases / max(self.seconds, 1e-9), 1),
                "cached": self.cached, "target": self.target,
                "by_operator": {k: dict(v) for k, v in sorted(self.by_operator.items())},
                "crash_cases": self.crashes[:20], "hang_cases": self.hangs[:20]}


class _Worker:
    """Runs cases on one thread so that a hang is noticed (and left behind) instead of waited on."""

    def __init__(self, target: Callable[[bytes], str]) -> None:
        self.target = target
        self.jobs: queue.Queue[bytes] = queue.Queue()
        self.done: queue.Queue[tuple[str, str | None]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            payload = self.jobs.get()
            try:
                self.done.put((self.target(payload), None))
            except Exception as e:  # noqa: BLE001 - a crash is what we are looking for
                tb = traceback.format_exception(e)
                self.done.put((f"CRASH:{type(e).__name__}", "".join(tb[-3:])[-1500:]))


def fuzz(target: Callable[[bytes], str], mutator: Mutator, cases: int, time_limit: float = 10.0,
         progress: Callable[[int, Report], None] | None = None, save: Path | None = None) -> Report:
    rep = Report()
    worker = _Worker(target)
    t_start = time.perf_counter()
    slowest = -1.0
    for i in range(cases):
        seed_name, op, payload = mutator.case(i)
        t0 = time.perf_counter()
        worker.jobs.put(payload)
        try:
            outcome, tb = worker.done.get(timeout=time_limit)
        except queue.Empty:
            outcome, tb = "hang", None
            worker = _Worker(target)  # the old thread is left to finish (or not) on its own
        dt = time.perf_counter() - t0
        rep.cases += 1
        rep.histogram[outcome] += 1
        rep.by_operator.setdefault(op, Counter())[outcome] += 1
        info = {"case": i, "seed": seed_name, "operator": op, "bytes": len(payload), "outcome": outcome}
        if dt > slowest:
            slowest = dt
            rep.slowest = {**info, "ms": round(dt * 1e3, 1)}
        if outcome == "hang":
            rep.hangs.append(info)
        elif outcome.startswith("CRASH"):
            rep.crashes.append({**info, "traceback": tb})
        if save is not None and (outcome == "hang" or outcome.startswith("CRASH")):
            save.mkdir(parents=True, exist_ok=True)
            (save / f"case-{i}.bin").write_bytes(payload)
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1, rep)
    rep.seconds = time.perf_counter() - t_start
    rep.cached = getattr(target, "cached", 0)
    return rep


def seed_frames(bundle: Any, codecs: list[str] | None = None, big: bool = True) -> list[Seed]:
    """bus.jpg and zidane.jpg through every codec of ``bundle``: its coarsest, a middle and the finest
    level for the progressive palette codec (1..L layers); levels 2 and 8 of the others: 2 and 8 bits
    for the baseline (``big=False``: 2 bits only, 160 KB frames instead of 1 MB, for quick runs), AVIF
    q30 and q20 of the picture at a quarter size (``big=False``: q30 only)."""
    from palettelink.codecs import make_encoder, spec
    from palettelink.image import load_image
    from palettelink.samples import sample_images

    out = []
    for codec in codecs or _available(bundle):
        enc = make_encoder(bundle, codec)
        levels = enc.levels()
        pick = sorted({levels[0], levels[len(levels) // 2], levels[-1]}) if spec(codec).progressive \
            else [lv for lv in levels if lv in ((2, 8) if big else (2,))] or levels[-1:]
        for p in sample_images():
            a = enc.analyse(load_image(p))
            for lv in pick:
                out.append(Seed(f"{codec}/{p.stem}/{spec(codec).level_label(lv)}", codec,
                                enc.encode_analysis(a, lv).payload))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=10000, help="cases to run (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutator (default 0)")
    p.add_argument("--bundle", default="fall-yolov8", help="bundle name, name/version or folder")
    p.add_argument("--bundles", default=None, help="bundles root (default $PALETTELINK_BUNDLES or ./bundles)")
    p.add_argument("--codec", action="append", default=None, help="only this codec (repeatable)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="send every case with Analyze to this server instead of decoding in-process")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds a case may take (default 10)")
    p.add_argument("--skip-network", action="store_true",
                   help="in-process: stop the palette decoder before its decoder network and the "
                        "avif decoder before the bundle's front (faster)")
    p.add_argument("--no-cache", action="store_true", help="in-process: decode every case, even repeats")
    p.add_argument("--no-every-byte", action="store_true", help="skip the cut at every byte of each frame")
    p.add_argument("--save", type=Path, default=None, help="write the payload of every crash/hang here")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from palettelink.bundle import default_root, find_bundle

    if args.cases < 1 or args.time_limit <= 0:
        print("palettelink fuzz: error: --cases must be ≥ 1 and --time-limit > 0")
        return 2
    side = "edge" if args.server else "server"
    bundle = find_bundle(args.bundle, args.bundles or default_root(), side=side)
    seeds = seed_frames(bundle, args.codec)
    mut = Mutator(seeds, args.seed, every_byte=not args.no_every_byte)
    target: Callable[[bytes], str]
    if args.server:
        target = OverGrpc(args.server, bundle.id, args.token, timeout=args.time_limit)
    else:
        target = InProcess(bundle, skip_network=args.skip_network, cache=not args.no_cache)
    print(f"fuzz: {args.cases} cases over {len(seeds)} frames ({', '.join(s.name for s in seeds)}), "
          f"{'server ' + args.server if args.server else 'in-process'}", flush=True)

    def progress(n: int, rep: Report) -> None:
        print(f"  {n} cases, {len(rep.crashes)} crashes, {len(rep.hangs)} hangs, "
              f"{n / (time.perf_counter() - t0):.0f} cases/s", flush=True)

    t0 = time.perf_counter()
    rep = fuzz(target, mut, args.cases, args.time_limit, progress, args.save)
    rep.target = f"server {args.server}" if args.server else "in-process" + (
        " (no decoder network)" if args.skip_network else "")
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
    return 1 if rep.crashes or rep.hangs else 0


def format_report(rep: Report) -> str:
    lines = [f"cases {rep.cases}  crashes {len(rep.crashes)}  hangs {len(rep.hangs)}  "
             f"{rep.seconds:.1f} s ({rep.cases / max(rep.seconds, 1e-9):.0f} cases/s; {rep.cached} repeats "
             f"answered from the cache)  target: {rep.target}",
             "status histogram:"]
    lines += [f"  {k:<22} {v:>8}" for k, v in rep.histogram.most_common()]
    if rep.slowest:
        s = rep.slowest
        lines.append(f"slowest case: #{s['case']} {s['operator']} on {s['seed']} ({s['bytes']} B) "
                     f"{s['ms']} ms -> {s['outcome']}")
    for c in rep.crashes[:5]:
        lines.append(f"CRASH case #{c['case']} {c['operator']} on {c['seed']}: {c['outcome']}\n"
                     f"{c['traceback']}")
    return "\n".join(lines)
