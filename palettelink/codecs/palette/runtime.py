"""The codec at run time: edge encoder (edge.onnx → embedded stream), server decoder (stream →
decoder.onnx → crossing tensors), and the registry spec."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palettelink import bitstream
from palettelink.bundle import Bundle
from palettelink.codecs import Analysis, CodecSpec, Decoded, Encoded, register
from palettelink.codecs.palette.stream import (
    GENERATE_MODES,
    DecodedIndices,
    check_level,
    decode_layers_full,
    encode_levels_between,
)
from palettelink.codecs.palette.tables import TABLES_FILE, PaletteTables, check_model
from palettelink.codecs.palette.window import (
    CODEC,
    frame_window,
    latent_stride,
    pad_indices,
    place,
    square_novelty,
    supports_window,
    window_latent_hw,
)
from palettelink.errors import BundleError, InvalidRequest, InvalidStream
from palettelink.front import GraphChoice, choose_graph, ort_session
from palettelink.image import Letterbox, Window, letterbox, rgb_size

WIRE_ID = 2  # the container's codec byte: never renumber (committed streams must decode)
FLAG_STATIC = 0x01  # container codec flag: the layers use the static tables (else the context model)


def _tables_file(bundle: Bundle) -> Path:
    spec = bundle.codecs.get(CODEC, {})
    return bundle.file(str(spec.get("tables", TABLES_FILE)))


@dataclass
class PaletteAnalysis(Analysis):
    """One image run through edge.onnx once: every level's stream can be cut from it."""

    indices: np.ndarray  # [G, h, w] finest
    letterbox: Letterbox
    layers: list[bytes] | None = None  # the progressive stream's layers, coarsest first, made on use
    layer_ms: float = 0.0  # time spent coding them (all calls)
    novelty: float | None = None  # edge.onnx's "novelty" (None: a bundle exported before it existed)
    window: Window | None = None  # the letterbox's part the indices cover (None: all of it)


class PaletteEncoder:
    """Edge: image → edge.onnx (level 0) → finest index maps → embedded stream cut at the level."""

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None, model: str | None = None,
                 precision: str | None = None, window: bool = False) -> None:
        """``window``: code the frame's window of the letterbox instead of the whole square
        (:mod:`palettelink.codecs.palette.window`), where the bundle can (:attr:`window_capable`);
        the edge asks for it once the server has said it decodes windows."""
        self.bundle = bundle
        self.tables = PaletteTables.load(_tables_file(bundle))
        self.model = check_model(self.tables, model)
        # edge.onnx, or its int8 variant where the bundle measured it agreeing (front.choose_graph)
        edge_graph = str(bundle.codecs.get(CODEC, {}).get("edge", "edge.onnx"))
        self.graph = choose_graph(bundle, edge_graph, precision)
        self.session = ort_session(str(bundle.file(self.graph.file)), threads)
        self.input_name = self.session.get_inputs()[0].name
        names = [i.name for i in self.session.get_inputs()]
        if "level" not in names:
            raise BundleError(f"{bundle.id}: edge.onnx has inputs {names}, needs 'images' and 'level'")
        has_novelty = any(o.name == "novelty" for o in self.session.get_outputs())
        self.outputs = ["indices", "novelty"] if has_novelty else ["indices"]
        self._offered = _manifest_levels(bundle)
        entry = bundle.codecs.get(CODEC, {})
        default = entry.get("default_level")
        offered_default = default is not None and int(default) in self._offered
        self._default = int(default) if offered_default else self._offered[0]
        threshold = (entry.get("novelty") or {}).get("threshold")
        self._novelty_threshold = float(threshold) if threshold is not None else None
        dims = list(self.session.get_inputs()[0].shape)[-2:]
        self.window_capable = (supports_window(bundle)
                               and not all(isinstance(d, int) for d in dims))
        self._pad_novelty = float(entry.get("pad_novelty", 0.0))
        self.window = window

    @property
    def window(self) -> bool:
        """Whether frames are coded as their window of the letterbox (only where the bundle can)."""
        return self._window

    @window.setter
    def window(self, on: bool) -> None:
        self._window = bool(on) and self.window_capable

    def levels(self) -> list[int]:
        """The levels this bundle offers, finest first: those that measured well at training
        (manifest ``levels``; ``palettelink.train.levels``), not every level the palette has."""
        return list(self._offered)

    def all_levels(self) -> list[int]:
        """Every level the palette can cut, finest first: an explicit ``--level`` may name one that is
        not offered (an expert's override, warned about); rate control chooses among offered ones."""
        return list(range(self.tables.n_levels))

    def default_level(self) -> int:
        """The level sent when the user asks for none: measured at training (manifest
        ``default_level``), the best accuracy at the fewest bits."""
        return self._default

    def novelty_threshold(self) -> float | None:
        """Novelty above which a frame lies outside what the palette learned (calibrated at training)."""
        return self._novelty_threshold

    def analyse(self, rgb: np.ndarray) -> PaletteAnalysis:
        win = frame_window(self.bundle, rgb_size(rgb)) if self.window else None
        x, info = letterbox(rgb, self.bundle.input_size, window=win)
        t0 = time.perf_counter()
        feeds = {self.input_name: x, "level": np.asarray(0, dtype=np.int64)}
        outs = self.session.run(self.outputs, feeds)
        ms = (time.perf_counter() - t0) * 1e3
        idx = outs[0]
        novelty = float(np.asarray(outs[1]).reshape(())) if len(outs) > 1 else None
        idx = np.asarray(idx).astype(np.int64).reshape(self.tables.n_groups, *np.shape(idx)[-2:])
        if idx.min() < 0 or idx.max() >= self.tables.sizes[0]:
            raise BundleError(f"{self.bundle.id}: edge.onnx produced indices outside the palette")
        if win is not None and novelty is not None:
            side = self.bundle.input_size // int(latent_stride(self.bundle) or 1)
            novelty = square_novelty(novelty, idx.shape[1] * idx.shape[2], side * side, self._pad_novelty)
        return PaletteAnalysis((info.width, info.height), ms, idx, info, novelty=novelty, window=win)

    def _layers(self, analysis: Analysis, level: int = 0) -> list[bytes]:
        """The stream's layers down to ``level`` at least: only the levels asked for are coded (the
        default level skips the finest layers), finer ones are added when a later call wants them."""
        if not isinstance(analysis, PaletteAnalysis):
            raise InvalidRequest(f"the palette codec cuts its own analysis, not a {type(analysis).__name__}")
        n_l = self.tables.n_levels
        have = analysis.layers or []
        if len(have) < n_l - level:
            t0 = time.perf_counter()
            analysis.layers = have + encode_levels_between(analysis.indices, self.tables,
                                                           n_l - 1 - len(have), level, self.model)
            analysis.layer_ms += (time.perf_counter() - t0) * 1e3
        return analysis.layers  # type: ignore[return-value]

    def _frame(self, analysis: PaletteAnalysis, layers: Sequence[bytes]) -> bitstream.Frame:
        _, h, w = analysis.indices.shape
        return bitstream.Frame(
            codec_id=WIRE_ID, param=self.tables.n_levels - 1, bundle_id=self.bundle.id,
            table_hash=self.bundle.table_hash, image_size=analysis.image_size,
            shapes=((self.tables.channels, h, w),), layers=tuple(layers), progressive=True,
            codec_flags=FLAG_STATIC if self.model == "static" else 0)

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded:
        """The stream for ``level`` (default: :meth:`default_level`): a prefix of the full progressive
        stream. Any level of the palette can be cut; rate control only chooses offered ones."""
        level = check_level(self.tables, self._default if level is None else level)
        layers = self._layers(analysis, level)[: self.tables.n_levels - level]
        assert isinstance(analysis, PaletteAnalysis)
        t0 = time.perf_counter()
        payload = bitstream.pack(self._frame(analysis, layers))
        ms = (time.perf_counter() - t0) * 1e3
        return Encoded(payload, CODEC, level, analysis.image_size,
                       {"front_ms": analysis.front_ms, "encode_ms": analysis.layer_ms + ms},
                       novelty=analysis.novelty)

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        """Exact payload bytes of every offered level (one progressive encode gives every prefix)."""
        layers = self._layers(analysis, min(self._offered))
        assert isinstance(analysis, PaletteAnalysis)
        n_l = self.tables.n_levels
        return {t: bitstream.packed_size(self._frame(analysis, layers[: n_l - t])) for t in self._offered}

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded:
        level = check_level(self.tables, self._default if level is None else level)
        return self.encode_analysis(self.analyse(rgb), level)


class PaletteDecoder:
    """Server: stream → index maps (complete layers) → centroids → decoder.onnx(z, level) → tensors.

    ``generate_to``: fill finer levels than were sent with the backward model (``mode`` argmax or
    seeded sampling) before decoding; the decoder network then runs at that level.
    """

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None, generate_to: int | None = None,
                 mode: str = "argmax", seed: int = 0, model: str | None = None,
                 precision: str | None = None) -> None:
        self.bundle = bundle
        self.tables = PaletteTables.load(_tables_file(bundle))
        self.model = check_model(self.tables, model)
        if mode not in GENERATE_MODES:
            raise InvalidRequest(f"generation mode must be one of {GENERATE_MODES}, got {mode!r}")
        self.generate_to, self.mode, self.seed = generate_to, mode, seed
        # decoder.onnx, or its int8 variant where the bundle measured it agreeing (front.choose_graph,
        # ``auto`` unless asked: the edge's process-wide precision is about edge graphs, not this one;
        # `palettelink int8 --graph decoder.onnx` measures an image bundle's generator)
        self.graph = self._choose_graph(bundle, precision)
        self.session = self._open(str(bundle.file(self.graph.file)), threads)
        outs = [o.name for o in self.session.get_outputs()]
        wanted = [t.name for t in bundle.tensors]
        self.outputs = wanted if set(wanted) <= set(outs) else outs
        zin = next((i for i in self.session.get_inputs() if i.name == "z"), None)
        if zin is None:
            raise BundleError(f"{bundle.id}: decoder.onnx lacks the input 'z'")
        dims = list(zin.shape)[-2:]
        latent = bundle.codecs.get(CODEC, {}).get("latent")
        self.latent_hw: tuple[int, int] | None = None
        if isinstance(latent, list | tuple) and len(latent) == 3:
            self.latent_hw = (int(latent[1]), int(latent[2]))
        elif all(isinstance(d, int) for d in dims):
            self.latent_hw = (int(dims[0]), int(dims[1]))

    def _choose_graph(self, bundle: Bundle, precision: str | None) -> GraphChoice:
        """Which decoder graph runs (a subclass serving another path chooses by its own rule)."""
        return choose_graph(bundle, "decoder.onnx", precision or "auto")

    def _open(self, path: str, threads: int | None) -> Any:
        """The onnxruntime session of the chosen graph (opened once, here)."""
        return ort_session(path, threads)

    def decode_indices(self, frame: bitstream.Frame, generate_to: int | None = None) -> DecodedIndices:
        """Validate the frame against the tables and decode its complete layers."""
        if frame.codec_id != WIRE_ID:
            raise InvalidStream(f"frame codec id {frame.codec_id} is not {CODEC!r}'s ({WIRE_ID})")
        if len(frame.shapes) != 1:
            raise InvalidStream(f"palette frame must describe one latent, got {len(frame.shapes)}")
        c, h, w = frame.shapes[0]
        if c != self.tables.channels:
            raise InvalidStream(f"latent has {c} channels; this bundle's palette codes "
                                f"{self.tables.channels}")
        if self.latent_hw is not None and (h, w) != self.latent_hw and self.window_of(frame) is None:
            win_hw = window_latent_hw(self.bundle, frame.image_size)
            iw, ih = frame.image_size
            also = (f" nor the {win_hw[0]}x{win_hw[1]} window of a {iw}x{ih} picture"
                    if win_hw and supports_window(self.bundle) else "")
            raise InvalidStream(f"latent {h}x{w} is not the bundle's {self.latent_hw[0]}x{self.latent_hw[1]}"
                                f"{also}")
        if not frame.progressive:
            raise InvalidStream("palette frame is not flagged progressive")
        if frame.declared_layers > self.tables.n_levels:
            raise InvalidStream(f"palette frame declares {frame.declared_layers} layers; this bundle's "
                                f"palette has {self.tables.n_levels} levels")
        gen = self.generate_to if generate_to is None else generate_to
        final = frame.param - (len(frame.layers) - 1)
        if gen is not None and gen > final:
            gen = None  # the bits already reach a finer level than asked for
        model = "static" if frame.codec_flags & FLAG_STATIC else self.model
        if frame.codec_flags & ~FLAG_STATIC:
            raise InvalidStream(f"unknown palette stream flags {frame.codec_flags:#x}")
        return decode_layers_full(frame.layers, self.tables, frame.param, (h, w), model, gen,
                                  self.mode, self.seed)

    def window_of(self, frame: bitstream.Frame) -> Window | None:
        """The window of the letterbox the frame's latent covers, where the edge sent one (its shape is
        the window's for the frame's image size and this bundle codes windows); None otherwise."""
        if len(frame.shapes) != 1 or not supports_window(self.bundle):
            return None
        hw = tuple(frame.shapes[0][1:])
        if hw == self.latent_hw or hw != window_latent_hw(self.bundle, frame.image_size):
            return None
        return frame_window(self.bundle, frame.image_size)

    def square_indices(self, frame: bitstream.Frame, r: DecodedIndices) -> np.ndarray:
        """The decoded index maps on the whole letterbox: a window's placed among the grey's entries."""
        win, pad = self.window_of(frame), pad_indices(self.bundle)
        if win is None or pad is None or self.latent_hw is None:
            return r.indices
        fill = self.tables.ids_at(pad.reshape(-1, 1, 1), r.level).reshape(-1)
        stride = int(latent_stride(self.bundle) or 1)
        return place(r.indices, win, self.latent_hw, stride, fill)

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int, generate_to: int | None = None) -> Decoded:
        t0 = time.perf_counter()
        r = self.decode_indices(frame, generate_to)
        z = self.tables.dequantise(self.square_indices(frame, r), r.level)
        t1 = time.perf_counter()
        outs = self.session.run(self.outputs, {"z": z, "level": np.asarray(r.level, dtype=np.int64)})
        t2 = time.perf_counter()
        tensors = [np.asarray(o, dtype=np.float32) for o in outs]
        return Decoded(tensors, CODEC, r.sent_level, frame.image_size, n_bytes, frame.truncated,
                       {"decode_ms": (t1 - t0) * 1e3, "decoder_ms": (t2 - t1) * 1e3,
                        "generated_level": float(r.level)})


def _manifest_levels(bundle: Bundle) -> list[int]:
    """Levels from the manifest (finest first) without loading the tables; the tables when it has none."""
    entry = bundle.codecs.get(CODEC, {})
    levels = entry.get("levels")
    if levels:
        return sorted(int(lv["level"]) if isinstance(lv, dict) else int(lv) for lv in levels)
    if entry.get("level_sizes"):
        return list(range(len(entry["level_sizes"])))
    return list(range(PaletteTables.load(_tables_file(bundle)).n_levels))


SPEC = register(CodecSpec(
    name=CODEC, wire_id=WIRE_ID, param="level", label="L{}", progressive=True, exact_sizes=True,
    cut="latent", levels=_manifest_levels, offered=lambda bundle: CODEC in bundle.codecs,
    encoder=PaletteEncoder, decoder=PaletteDecoder, preference=10,
))
