"""The PaletteLink bitstream container (DESIGN §3).

One coded frame is self-contained::

    magic "PLNK" | version u8 | codec u8 | param u8 | flags u8 (bit 0 progressive, bits 1-7 codec's)
    bundle id (u8 length + UTF-8 "name/version") | table hash (8 bytes: sha256 prefix)
    image W u16 | image H u16
    n_tensors u8 | per tensor: C u16, h u16, w u16
    n_layers u8 | per layer: uvarint length, bytes

``codec`` is the codec's wire id from the registry (:mod:`palettelink.codecs`); ``param`` is codec
specific (baseline: bits per value; palette: the coarsest level sent). Layers are
length-prefixed so a progressive stream can be cut after any layer. Nothing is allocated from a size
before it has been checked against the bytes actually present and against hard limits, and every
malformed input raises :class:`~palettelink.errors.InvalidStream`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from palettelink.errors import InvalidStream

MAGIC = b"PLNK"
FORMAT_VERSION = 1
HASH_BYTES = 8
MAX_BUNDLE_ID = 64
MAX_TENSORS = 16
MAX_LAYERS = 64
MAX_TENSOR_VALUES = 1 << 24
MAX_IMAGE_SIDE = 16384

FLAG_PROGRESSIVE = 0x01

_FIXED = struct.Struct(">4sBBBB")


@dataclass(frozen=True)
class Frame:
    """A parsed (or to-be-written) coded frame."""

    codec: str
    param: int
    bundle_id: str
    table_hash: bytes
    image_size: tuple[int, int]  # (W, H) of the original image
    shapes: tuple[tuple[int, int, int], ...]
    layers: tuple[bytes, ...] = field(default_factory=tuple)
    progressive: bool = False
    codec_flags: int = 0  # 7 codec-specific bits (palette: bit 0 = static entropy tables)
    truncated: bool = False  # set by ``unpack`` when trailing layers were cut off

    def bpp(self, n_bytes: int) -> float:
        """Bits per pixel of the *original* image, as MPEG FCM counts them."""
        w, h = self.image_size
        return 8.0 * n_bytes / (w * h)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _wire_id(codec: str) -> int | None:
    """The codec byte, from the codec registry (imported here: the registry imports this module)."""
    from palettelink import codecs

    return next((s.wire_id for s in codecs.specs() if s.name == codec), None)


def _codec_name(wire_id: int) -> str | None:
    from palettelink import codecs

    s = codecs.spec_for_wire_id(wire_id)
    return None if s is None else s.name


def pack(frame: Frame) -> bytes:
    """Serialise ``frame``. Raises ``ValueError`` for fields the format cannot hold (a bug upstream)."""
    codec_id = _wire_id(frame.codec)
    if codec_id is None:
        raise ValueError(f"unknown codec {frame.codec!r}")
    bid = frame.bundle_id.encode()
    if not 0 < len(bid) <= MAX_BUNDLE_ID:
        raise ValueError("bundle id must be 1..64 bytes")
    if len(frame.table_hash) != HASH_BYTES:
        raise ValueError(f"table hash must be {HASH_BYTES} bytes")
    w, h = frame.image_size
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise ValueError(f"image size {w}x{h} out of range")
    if len(frame.shapes) > MAX_TENSORS or len(frame.layers) > MAX_LAYERS:
        raise ValueError("too many tensors or layers")
    if not 0 <= frame.param <= 255:
        raise ValueError("param must fit a byte")
    if not 0 <= frame.codec_flags < 128:
        raise ValueError("codec flags must fit 7 bits")
    out = bytearray(
        _FIXED.pack(MAGIC, FORMAT_VERSION, codec_id, frame.param,
                    (FLAG_PROGRESSIVE if frame.progressive else 0) | (frame.codec_flags << 1))
    )
    out += bytes([len(bid)]) + bid + frame.table_hash
    out += struct.pack(">HH", w, h)
    out.append(len(frame.shapes))
    for c, hh, ww in frame.shapes:
        out += struct.pack(">HHH", c, hh, ww)
    out.append(len(frame.layers))
    for layer in frame.layers:
        out += _uvarint(len(layer)) + layer
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidStream(
                f"truncated stream: need {n} bytes for {what} at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def uvarint(self, what: str) -> int:
        n, shift = 0, 0
        for _ in range(5):  # lengths < 2**35 are plenty; longer is junk
            b = self.u8(what)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise InvalidStream(f"malformed length for {what}")


def unpack(data: bytes, *, allow_truncated_layers: bool = False) -> Frame:
    """Parse a coded frame, checking every field.

    With ``allow_truncated_layers`` a frame whose *last* layers are missing (a cut progressive
    stream) parses to the complete layers only; header damage is still an error.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidStream("payload must be bytes")
    r = _Reader(bytes(data))
    if len(data) < _FIXED.size:
        raise InvalidStream(f"truncated stream: {len(data)} bytes is shorter than the fixed header")
    magic, version, codec_id, param, flags = _FIXED.unpack(r.take(_FIXED.size, "header"))
    if magic != MAGIC:
        raise InvalidStream(f"wrong magic {magic!r}: not a PaletteLink stream (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise InvalidStream(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    codec = _codec_name(codec_id)
    if codec is None:
        raise InvalidStream(f"unknown codec id {codec_id}")
    n = r.u8("bundle id length")
    if not 0 < n <= MAX_BUNDLE_ID:
        raise InvalidStream(f"bundle id length {n} out of range")
    try:
        bundle_id = r.take(n, "bundle id").decode()
    except UnicodeDecodeError as e:
        raise InvalidStream("bundle id is not UTF-8") from e
    table_hash = r.take(HASH_BYTES, "table hash")
    w, h = struct.unpack(">HH", r.take(4, "image size"))
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise InvalidStream(f"image size {w}x{h} out of range")
    nt = r.u8("tensor count")
    if not 0 < nt <= MAX_TENSORS:
        raise InvalidStream(f"tensor count {nt} out of range 1..{MAX_TENSORS}")
    shapes = []
    for i in range(nt):
        c, hh, ww = struct.unpack(">HHH", r.take(6, f"shape of tensor {i}"))
        if c * hh * ww == 0 or c * hh * ww > MAX_TENSOR_VALUES:
            raise InvalidStream(f"tensor {i} shape {c}x{hh}x{ww} is empty or absurd")
        shapes.append((c, hh, ww))
    nl = r.u8("layer count")
    if nl > MAX_LAYERS:
        raise InvalidStream(f"layer count {nl} out of range")
    layers = []
    truncated = False
    for i in range(nl):
        try:
            length = r.uvarint(f"length of layer {i}")
            layers.append(r.take(length, f"layer {i}"))
        except InvalidStream:
            if allow_truncated_layers and i > 0:
                truncated = True
                break
            raise
    if not truncated and r.pos != len(r.data):
        raise InvalidStream(f"{len(r.data) - r.pos} bytes of trailing junk after the last layer")
    if not layers:
        raise InvalidStream("stream holds no layer")
    return Frame(
        codec=codec, param=param, bundle_id=bundle_id, table_hash=table_hash,
        image_size=(w, h), shapes=tuple(shapes), layers=tuple(layers),
        progressive=bool(flags & FLAG_PROGRESSIVE), codec_flags=flags >> 1, truncated=truncated,
    )
