"""Codec registry: name → (edge encoder, server decoder). A new codec is one entry here.

Edge encoders take an RGB image and produce a coded frame; server decoders take the bytes and give
back the tensors that cross the split. Both are pure numpy + onnxruntime + constriction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from palettelink import bitstream
from palettelink.bundle import Bundle
from palettelink.errors import BundleMismatch, InvalidRequest, InvalidStream


@dataclass
class Encoded:
    payload: bytes
    codec: str
    level: int
    image_size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def bpp(self) -> float:
        w, h = self.image_size
        return 8.0 * len(self.payload) / (w * h)


@dataclass
class Decoded:
    tensors: list[np.ndarray]  # each 1xCxhxw float32, in the bundle's tensor order
    codec: str
    level: int
    image_size: tuple[int, int]
    n_bytes: int
    truncated: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


class EdgeEncoder(Protocol):
    codec: str

    def levels(self) -> list[int]: ...

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded: ...


class FeatureDecoder(Protocol):
    codec: str

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded: ...


def check_bundle(frame: bitstream.Frame, bundle: Bundle) -> None:
    """Refuse a stream made for another bundle or other frozen tables."""
    if frame.bundle_id != bundle.id:
        raise BundleMismatch(f"stream was coded for bundle {frame.bundle_id!r}, this is {bundle.id!r}")
    if frame.table_hash != bundle.table_hash:
        raise BundleMismatch(
            f"stream table hash {frame.table_hash.hex()} does not match bundle {bundle.id} "
            f"({bundle.table_hash.hex()}): edge and server carry different codec tables"
        )


def available(bundle: Bundle) -> list[str]:
    names = ["baseline"]
    if "palette" in bundle.codecs:
        names.insert(0, "palette")
    return names


def default_codec(bundle: Bundle) -> str:
    return available(bundle)[0]


def make_encoder(bundle: Bundle, codec: str | None = None) -> EdgeEncoder:
    codec = codec or default_codec(bundle)
    if codec not in available(bundle):
        raise InvalidRequest(f"bundle {bundle.id} offers codecs {available(bundle)}, not {codec!r}")
    if codec == "baseline":
        from palettelink.codecs.baseline import BaselineEncoder

        return BaselineEncoder(bundle)
    from palettelink.codecs.palette import PaletteEncoder

    return PaletteEncoder(bundle)


class Decoder:
    """Server side: parse, check bundle, dispatch on the codec named in the stream header."""

    def __init__(self, bundle: Bundle, overrides: dict[str, FeatureDecoder] | None = None) -> None:
        """``overrides``: codec name → a decoder configured differently (e.g. generative refinement)."""
        self.bundle = bundle
        self._impl: dict[str, FeatureDecoder] = dict(overrides or {})
        self._lock = threading.Lock()

    def _get(self, codec: str) -> FeatureDecoder:
        with self._lock:
            return self._get_locked(codec)

    def _get_locked(self, codec: str) -> FeatureDecoder:
        if codec not in self._impl:
            if codec not in available(self.bundle):
                raise InvalidStream(f"bundle {self.bundle.id} cannot decode codec {codec!r}")
            if codec == "baseline":
                from palettelink.codecs.baseline import BaselineDecoder

                self._impl[codec] = BaselineDecoder(self.bundle)
            else:
                from palettelink.codecs.palette import PaletteDecoder

                self._impl[codec] = PaletteDecoder(self.bundle)
        return self._impl[codec]

    def decode(self, payload: bytes) -> Decoded:
        frame = bitstream.unpack(payload, allow_truncated_layers=True)
        check_bundle(frame, self.bundle)
        return self._get(frame.codec).decode_frame(frame, len(payload))
