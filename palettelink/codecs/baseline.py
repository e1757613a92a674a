"""Baseline codec: per-channel uniform quantisation of every split tensor to b bits + ANS.

This is the reference every learned codec is compared with (DESIGN §1: it costs 20 bpp at 8 bits).
Each tensor is one layer::

    C × (lo, hi) as float16 | 2**b uvarint frequencies (sum 2**16) | ANS words

The quantiser reads lo/hi *after* rounding them to float16, so the decoder's dequantisation uses
exactly the values the encoder used.
"""

from __future__ import annotations

import time

import numpy as np

from palettelink import bitstream, entropy
from palettelink.bundle import Bundle
from palettelink.codecs import Analysis, CodecSpec, CrossingAnalysis, Decoded, Encoded, register
from palettelink.errors import InvalidRequest, InvalidStream
from palettelink.front import Front

CODEC = "baseline"
WIRE_ID = 1  # the container's codec byte: never renumber (committed streams must decode)
BITS = tuple(range(2, 9))
LEVELS = tuple(reversed(BITS))  # finest (8 bits) first


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or int(bits) not in BITS:
        raise InvalidRequest(f"baseline bits must be one of {list(BITS)}, got {bits}")
    return int(bits)


def quantise(t: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C×h×w float → (symbols uint, lo f16, hi f16)."""
    c = t.shape[0]
    flat = t.reshape(c, -1).astype(np.float32)
    lo = flat.min(axis=1).astype(np.float16)
    hi = flat.max(axis=1).astype(np.float16)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    span = np.maximum(hi32 - lo32, np.float32(1e-6))
    levels = np.float32((1 << bits) - 1)
    q = np.rint((flat - lo32[:, None]) / span[:, None] * levels)
    return np.clip(q, 0, levels).astype(np.int32), lo, hi


def dequantise(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    span = np.maximum(hi32 - lo32, np.float32(1e-6))
    step = span / np.float32((1 << bits) - 1)
    return lo32[:, None] + q.astype(np.float32) * step[:, None]


def encode_tensor(t: np.ndarray, bits: int) -> bytes:
    q, lo, hi = quantise(t, bits)
    table = entropy.normalise_counts(np.bincount(q.ravel(), minlength=1 << bits))
    side = np.stack([lo, hi], axis=1).astype("<f2").tobytes()
    return side + entropy.encode_uvarints(table) + entropy.encode(q.ravel(), table)


def decode_tensor(layer: bytes, shape: tuple[int, int, int], bits: int) -> np.ndarray:
    c, h, w = shape
    if len(layer) < 4 * c:
        raise InvalidStream(f"baseline layer of {len(layer)} bytes too short for {c} channel ranges")
    side = np.frombuffer(layer[: 4 * c], dtype="<f2").reshape(c, 2)
    if not np.isfinite(side).all():
        raise InvalidStream("channel ranges are not finite")
    if (side[:, 0] > side[:, 1]).any():
        raise InvalidStream("a channel range has min > max (the encoder sends min ≤ max)")
    table, pos = entropy.decode_uvarints(layer, 1 << bits, 4 * c)
    if table.sum() != 1 << entropy.PROB_BITS or (table <= 0).any():
        raise InvalidStream("baseline frequency table is not a valid distribution")
    q = entropy.decode(layer[pos:], c * h * w, table)
    return dequantise(q.reshape(c, -1), side[:, 0], side[:, 1], bits).reshape(1, c, h, w)


class BaselineEncoder:
    """Edge: front.onnx once per frame (the analysis), then any bit depth coded from its tensors."""

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.front = Front(bundle, threads)

    def levels(self) -> list[int]:
        return list(LEVELS)

    def encode_tensors(self, tensors: list[np.ndarray], image_size: tuple[int, int], bits: int) -> bytes:
        bits = _check_bits(bits)
        layers = tuple(encode_tensor(t[0], bits) for t in tensors)
        frame = bitstream.Frame(
            codec_id=WIRE_ID, param=bits, bundle_id=self.bundle.id, table_hash=self.bundle.table_hash,
            image_size=image_size, shapes=tuple(tuple(t.shape[1:]) for t in tensors), layers=layers,
        )
        return bitstream.pack(frame)

    def analyse(self, rgb: np.ndarray) -> CrossingAnalysis:
        tensors, info, front_ms = self.front.run(rgb)
        return CrossingAnalysis((info.width, info.height), front_ms, tensors)

    def _coded(self, analysis: Analysis, bits: int) -> bytes:
        if not isinstance(analysis, CrossingAnalysis):
            raise InvalidRequest(f"the baseline codes crossing tensors, not a {type(analysis).__name__}")
        if bits not in analysis.coded:
            t0 = time.perf_counter()
            analysis.coded[bits] = self.encode_tensors(analysis.tensors, analysis.image_size, bits)
            analysis.encode_ms += (time.perf_counter() - t0) * 1e3
        return analysis.coded[bits]

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        """Exact, by coding every bit depth (kept in the analysis: the chosen one is not coded twice)."""
        return {bits: len(self._coded(analysis, bits)) for bits in LEVELS}

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded:
        """``encode_ms`` counts all coding done on this analysis (sizing every level included)."""
        bits = _check_bits(8 if level is None else level)
        payload = self._coded(analysis, bits)
        assert isinstance(analysis, CrossingAnalysis)
        return Encoded(payload, CODEC, bits, analysis.image_size,
                       {"front_ms": analysis.front_ms, "encode_ms": analysis.encode_ms})

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded:
        bits = _check_bits(8 if level is None else level)
        return self.encode_analysis(self.analyse(rgb), bits)


class BaselineDecoder:
    codec = CODEC

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.shapes = [t.shape for t in bundle.tensors]

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
        bits = frame.param
        if bits not in BITS:
            raise InvalidStream(f"baseline bits {bits} outside {list(BITS)}")
        if frame.progressive or frame.codec_flags or frame.truncated:
            raise InvalidStream("baseline frames are whole and carry no flags (progressive/codec flags "
                                "set, or layers cut off)")
        if list(frame.shapes) != self.shapes:
            raise InvalidStream(f"tensor shapes {list(frame.shapes)} do not match the bundle's {self.shapes}")
        if len(frame.layers) != len(self.shapes):
            raise InvalidStream(f"baseline frame has {len(frame.layers)} layers, needs {len(self.shapes)}")
        t0 = time.perf_counter()
        tensors = [decode_tensor(layer, s, bits) for layer, s in zip(frame.layers, self.shapes, strict=True)]
        return Decoded(tensors, CODEC, bits, frame.image_size, n_bytes,
                       timings_ms={"decode_ms": (time.perf_counter() - t0) * 1e3})


SPEC = register(CodecSpec(
    name=CODEC, wire_id=WIRE_ID, param="bits", label="{}b", progressive=False, exact_sizes=True,
    cut="crossing", levels=lambda bundle: list(LEVELS), offered=lambda bundle: True,
    encoder=BaselineEncoder, decoder=BaselineDecoder, preference=90,
))
