"""The PaletteLink bitstream container (DESIGN §3), format version 2.

One coded frame is self-contained::

    magic "PLNK" | version u8 (2) | codec u8 | param u8 | flags u8 (bit 0 progressive, bits 1-7 codec's)
    bundle id (u8 length + UTF-8 "name/version") | table hash (8 bytes: sha256 prefix)
    image W u16 | image H u16
    n_tensors u8 | per tensor: C u16, h u16, w u16
    n_layers u8 | per layer: uvarint length                          (end of the header)
    per layer: its bytes | CRC-32 u32 of everything before it except earlier CRCs

``codec`` is the codec's wire id (1..255, :attr:`Frame.codec_id`); the container carries it and knows
no codec: the registry one floor up (:mod:`palettelink.codecs`) maps ids to codecs and refuses ids it
does not know. ``param`` is codec specific (baseline: bits per value; palette: the coarsest level
sent). All integers are big-endian.

Integrity: the CRC-32 (``zlib.crc32``) after layer i covers the header and layers 0..i, i.e. it is
chained: ``crc_i = crc32(layer_i, crc_{i-1})`` with ``crc_{-1} = crc32(header)``. So a flipped bit
anywhere (header, layer lengths, layer bytes, a CRC) is refused, as are layers reordered, repeated or
spliced from another frame, while a progressive stream cut after any layer still verifies: every
complete layer's CRC is checked, the header's through layer 0's. Layer lengths live in the header, so
a damaged length can never pass for a cut stream.

With ``allow_truncated_layers`` a *progressive* frame shorter than its header declares (a cut stream)
parses to its complete layers (at least one); ``Frame.missing_layers`` says how many were cut off.
Nothing is allocated from a size before it has been checked against the bytes actually present and
against hard limits, and every malformed input raises :class:`~palettelink.errors.InvalidStream`.
Format version 1 (no checksums) is refused with a message naming both versions.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from palettelink.errors import InvalidStream

MAGIC = b"PLNK"
FORMAT_VERSION = 2
CRC_BYTES = 4
HASH_BYTES = 8
MAX_BUNDLE_ID = 64
MAX_TENSORS = 16
MAX_LAYERS = 64
MAX_TENSOR_VALUES = 1 << 24
MAX_IMAGE_SIDE = 16384

FLAG_PROGRESSIVE = 0x01

_FIXED = struct.Struct(">4sBBBB")
_CRC = struct.Struct(">I")


@dataclass(frozen=True)
class Frame:
    """A parsed (or to-be-written) coded frame."""

    codec_id: int  # the codec's wire id (the registry, palettelink.codecs, names it)
    param: int
    bundle_id: str
    table_hash: bytes
    image_size: tuple[int, int]  # (W, H) of the original image
    shapes: tuple[tuple[int, int, int], ...]
    layers: tuple[bytes, ...] = field(default_factory=tuple)
    progressive: bool = False
    codec_flags: int = 0  # 7 codec-specific bits (palette: bit 0 = static entropy tables)
    truncated: bool = False  # set by ``unpack`` when trailing layers were cut off
    missing_layers: int = 0  # set by ``unpack``: layers the header declares that were cut off

    @property
    def declared_layers(self) -> int:
        """How many layers the sender coded (the complete ones plus those cut off in transit)."""
        return len(self.layers) + self.missing_layers

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


def pack(frame: Frame) -> bytes:
    """Serialise ``frame``. Raises ``ValueError`` for fields the format cannot hold (a bug upstream)."""
    if not 0 < frame.codec_id < 256:
        raise ValueError(f"codec id {frame.codec_id} must be 1..255")
    bid = frame.bundle_id.encode()
    if not 0 < len(bid) <= MAX_BUNDLE_ID:
        raise ValueError("bundle id must be 1..64 bytes")
    if len(frame.table_hash) != HASH_BYTES:
        raise ValueError(f"table hash must be {HASH_BYTES} bytes")
    w, h = frame.image_size
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise ValueError(f"image size {w}x{h} out of range")
    if len(frame.shapes) > MAX_TENSORS or not 0 < len(frame.layers) <= MAX_LAYERS:
        raise ValueError(f"a frame holds 1..{MAX_TENSORS} tensors and 1..{MAX_LAYERS} layers")
    if not 0 <= frame.param <= 255:
        raise ValueError("param must fit a byte")
    if not 0 <= frame.codec_flags < 128:
        raise ValueError("codec flags must fit 7 bits")
    out = bytearray(
        _FIXED.pack(MAGIC, FORMAT_VERSION, frame.codec_id, frame.param,
                    (FLAG_PROGRESSIVE if frame.progressive else 0) | (frame.codec_flags << 1))
    )
    out += bytes([len(bid)]) + bid + frame.table_hash
    out += struct.pack(">HH", w, h)
    out.append(len(frame.shapes))
    for c, hh, ww in frame.shapes:
        out += struct.pack(">HHH", c, hh, ww)
    out.append(len(frame.layers))
    for layer in frame.layers:
        out += _uvarint(len(layer))
    crc = zlib.crc32(out)
    for layer in frame.layers:
        crc = zlib.crc32(layer, crc)
        out += layer + _CRC.pack(crc)
    return bytes(out)


def packed_size(frame: Frame) -> int:
    """``len(pack(frame))`` without building it (rate control sizes every level of a frame)."""
    header = _FIXED.size + 1 + len(frame.bundle_id.encode()) + HASH_BYTES + 4 + 1 + 6 * len(frame.shapes) + 1
    return header + sum(len(_uvarint(len(x))) + len(x) + CRC_BYTES for x in frame.layers)


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
    """Parse a coded frame, checking every field and every complete layer's CRC.

    With ``allow_truncated_layers`` a progressive frame whose *last* layers are missing or incomplete
    (a cut stream) parses to the complete layers only; any damage is still an error.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidStream("payload must be bytes")
    data = bytes(data)
    r = _Reader(data)
    if len(data) < _FIXED.size:
        raise InvalidStream(f"truncated stream: {len(data)} bytes is shorter than the fixed header")
    magic, version, codec_id, param, flags = _FIXED.unpack(r.take(_FIXED.size, "header"))
    if magic != MAGIC:
        raise InvalidStream(f"wrong magic {magic!r}: not a PaletteLink stream (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        hint = " (a stream without checksums: re-encode it with a current edge)" if version == 1 else ""
        raise InvalidStream(f"unsupported stream format version {version}; this build reads format version "
                            f"{FORMAT_VERSION}{hint}")
    if codec_id == 0:
        raise InvalidStream("codec id 0 names no codec")
    n = r.u8("bundle id length")
    if not 0 < n <= MAX_BUNDLE_ID:
        raise InvalidStream(f"bundle id length {n} out of range")
    bundle_raw = r.take(n, "bundle id")
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
    if not 0 < nl <= MAX_LAYERS:
        raise InvalidStream("stream holds no layer" if nl == 0 else f"layer count {nl} out of range")
    lengths = [r.uvarint(f"length of layer {i}") for i in range(nl)]
    progressive = bool(flags & FLAG_PROGRESSIVE)
    header_end = r.pos
    declared = header_end + sum(lengths) + CRC_BYTES * nl
    if len(data) > declared:
        raise InvalidStream(f"{len(data) - declared} bytes of trailing junk after the last layer")
    crc = zlib.crc32(memoryview(data)[:header_end])
    layers: list[bytes] = []
    pos = header_end
    for i, length in enumerate(lengths):
        end = pos + length
        if end + CRC_BYTES > len(data):
            if allow_truncated_layers and progressive and layers:
                break  # a cut progressive stream: the complete layers decode to a coarser level
            raise InvalidStream(
                f"truncated stream: {len(data)} of the {declared} bytes its header declares "
                f"(layer {i} of {nl} incomplete)")
        layer = data[pos:end]
        crc = zlib.crc32(layer, crc)
        (sent,) = _CRC.unpack_from(data, end)
        if sent != crc:
            where = "the header or layer 0" if i == 0 else f"layer {i} (or its order)"
            raise InvalidStream(f"checksum mismatch in {where}: the frame is damaged")
        layers.append(layer)
        pos = end + CRC_BYTES
    try:
        bundle_id = bundle_raw.decode()
    except UnicodeDecodeError as e:
        raise InvalidStream("bundle id is not UTF-8") from e
    missing = nl - len(layers)
    return Frame(
        codec_id=codec_id, param=param, bundle_id=bundle_id, table_hash=table_hash,
        image_size=(w, h), shapes=tuple(shapes), layers=tuple(layers),
        progressive=progressive, codec_flags=flags >> 1, truncated=missing > 0, missing_layers=missing,
    )
