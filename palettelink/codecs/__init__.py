"""Codec registry: the one place that knows each codec's name, wire id and capabilities.

A codec is one module in this package that calls :func:`register` with a :class:`CodecSpec` at
import time; the registry imports every module of the package the first time it is asked, so the
decoder, the edge's rate control, the bench, ``palettelink info`` and the server all see a new codec
without naming it. The container (:mod:`palettelink.bitstream`, one floor down) carries only the
codec's wire id; this registry maps ids to codecs and back (:func:`wire_id`, :func:`codec_of`) and
:func:`unpack` is the container's parse plus that check. Every edge encoder has the same small
interface (:class:`EdgeEncoder`): analyse an image once, then size and cut any level from that
analysis. Pure numpy + onnxruntime + constriction.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

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
    # How far the frame lies from what the codec learned (palette: edge.onnx's ``novelty``), None for
    # a codec that cannot tell; ``fallback`` says what rate control did about it, if anything.
    novelty: float | None = None
    fallback: str | None = None

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
    # (x0, y0, x1, y1) of the letterboxed input the tensors cover, in its pixels, where a decoder
    # rebuilt only the frame's own rows/columns (palettelink.models.windowed_palette); None: all of it
    window: tuple[int, int, int, int] | None = None


@dataclass
class Analysis:
    """One run of a codec's edge network over an image: every level is sized and cut from it, so
    rate control and the bench never run the network twice for one frame."""

    image_size: tuple[int, int]  # (W, H) of the original image
    front_ms: float


@dataclass
class CrossingAnalysis(Analysis):
    """The analysis of a codec whose cut is ``"crossing"``: the front's tensors as they are. Anyone
    holding those tensors (the bench) may build one and skip the front."""

    tensors: list[np.ndarray]
    coded: dict[int, bytes] = field(default_factory=dict)  # payloads made so far, by level
    encode_ms: float = 0.0  # coding time spent on this analysis so far


class EdgeEncoder(Protocol):
    """What every edge encoder offers; levels are always listed finest first."""

    codec: str

    def levels(self) -> list[int]: ...

    def analyse(self, rgb: np.ndarray) -> Analysis: ...

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        """Exact payload bytes of every level (meaningful where the spec's ``exact_sizes``)."""
        ...

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded: ...

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded: ...


class FeatureDecoder(Protocol):
    codec: str

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded: ...


Cut = Literal["crossing", "latent", "picture"]


@dataclass(frozen=True)
class CodecSpec:
    """A codec as the rest of the system sees it.

    ``wire_id`` is the container's codec byte: never renumber one (committed streams must decode).
    ``param`` names a level on the command line (``bits`` or ``level``); ``label`` formats one for
    tables (a format string taking the level, or a function of it). ``progressive``: a prefix of a
    stream decodes to a coarser level. ``exact_sizes``: ``level_sizes(analysis)`` gives the exact
    payload size of every level, so rate control sizes first and codes once. ``cut``: what is coded,
    the split's crossing tensors, a learned latent, or the picture itself (the server runs the front
    on what it decodes). ``levels(bundle)`` reads the manifest only (no ONNX session), finest first.
    ``preference``: the lowest offered one is a bundle's default codec, unless an offered codec's
    ``default_for(bundle)`` is true: that one is the default (a measured decision for a kind of bundle,
    e.g. AVIF for image bundles, issue 16), the others follow by preference.
    """

    name: str
    wire_id: int
    param: str
    label: str | Callable[[int], str]  # format with one level, e.g. "{}b", "L{}"; or a function
    progressive: bool
    exact_sizes: bool
    cut: Cut
    levels: Callable[[Bundle], list[int]]
    offered: Callable[[Bundle], bool]
    encoder: Callable[[Bundle], EdgeEncoder]
    decoder: Callable[[Bundle], FeatureDecoder]
    preference: int = 100
    default_for: Callable[[Bundle], bool] | None = None

    def level_label(self, level: int) -> str:
        return self.label(level) if callable(self.label) else self.label.format(level)


_REGISTRY: dict[str, CodecSpec] = {}
_discovered = False
_discover_lock = threading.RLock()


def register(spec: CodecSpec) -> CodecSpec:
    """Add ``spec``; a second codec with the same name or wire id is a bug, refused here."""
    if not 0 < spec.wire_id < 256:
        raise ValueError(f"codec {spec.name!r}: wire id {spec.wire_id} does not fit the header byte")
    for other in _REGISTRY.values():
        if other.name != spec.name and other.wire_id == spec.wire_id:
            raise ValueError(f"codec {spec.name!r} reuses wire id {spec.wire_id} of {other.name!r}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"codec {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every module of this package once (each registers its codec)."""
    global _discovered
    if _discovered:
        return
    with _discover_lock:
        if not _discovered:
            for m in pkgutil.iter_modules(__path__):
                importlib.import_module(f"{__name__}.{m.name}")
            _discovered = True


def specs() -> list[CodecSpec]:
    """Every registered codec, preferred first."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda s: (s.preference, s.name))


def spec(name: str) -> CodecSpec:
    _discover()
    if name not in _REGISTRY:
        raise InvalidRequest(f"unknown codec {name!r}; known: {', '.join(s.name for s in specs())}")
    return _REGISTRY[name]


def spec_for_wire_id(wire_id: int) -> CodecSpec | None:
    return next((s for s in specs() if s.wire_id == wire_id), None)


def wire_id(name: str) -> int:
    """The container's codec byte for the codec ``name`` (:class:`InvalidRequest` if unknown)."""
    return spec(name).wire_id


def codec_of(frame: bitstream.Frame) -> CodecSpec:
    """The codec a parsed frame names; an id no codec registered is an :class:`InvalidStream`."""
    s = spec_for_wire_id(frame.codec_id)
    if s is None:
        raise InvalidStream(f"unknown codec id {frame.codec_id}")
    return s


def unpack(data: bytes, *, allow_truncated_layers: bool = False) -> bitstream.Frame:
    """:func:`palettelink.bitstream.unpack`, then refuse a codec id no codec registered."""
    frame = bitstream.unpack(data, allow_truncated_layers=allow_truncated_layers)
    codec_of(frame)
    return frame


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
    """The codecs ``bundle`` can run, its default first (:class:`CodecSpec`: ``default_for``, then
    ``preference``)."""
    offered = [s for s in specs() if s.offered(bundle)]
    first = [s for s in offered if s.default_for is not None and s.default_for(bundle)]
    return [s.name for s in first[:1] + [s for s in offered if s not in first[:1]]]


def default_codec(bundle: Bundle) -> str:
    return available(bundle)[0]


def make_encoder(bundle: Bundle, codec: str | None = None) -> EdgeEncoder:
    codec = codec or default_codec(bundle)
    if codec not in available(bundle):
        raise InvalidRequest(f"bundle {bundle.id} offers codecs {available(bundle)}, not {codec!r}")
    return spec(codec).encoder(bundle)


class Decoder:
    """Server side: parse, check bundle, dispatch on the codec named in the stream header."""

    def __init__(self, bundle: Bundle, overrides: dict[str, FeatureDecoder] | None = None) -> None:
        """``overrides``: codec name → a decoder configured differently (e.g. generative refinement)."""
        self.bundle = bundle
        self._impl: dict[str, FeatureDecoder] = dict(overrides or {})
        self._lock = threading.Lock()

    def _get(self, codec: str) -> FeatureDecoder:
        with self._lock:
            if codec not in self._impl:
                if codec not in available(self.bundle):
                    raise InvalidStream(f"bundle {self.bundle.id} cannot decode codec {codec!r}")
                self._impl[codec] = spec(codec).decoder(self.bundle)
            return self._impl[codec]

    def decode(self, payload: bytes) -> Decoded:
        frame = bitstream.unpack(payload, allow_truncated_layers=True)
        codec = codec_of(frame).name
        check_bundle(frame, self.bundle)
        return self._get(codec).decode_frame(frame, len(payload))
