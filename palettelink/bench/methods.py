"""Benchmark methods: each turns one image at one rate point into (bytes, decoded thing).

A method decodes either to the *crossing tensors* (feature codecs: they go through the bundle's
tail) or to an *image* (JPEG/WebP/AVIF anchors: they go through the whole detector). Adding a row
to the benchmark (a new codec, an anchor, an ablation) is one class with ``@register("name")``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image, features

from palettelink import codecs
from palettelink.bundle import Bundle
from palettelink.codecs.palette.window import CODEC as PALETTE
from palettelink.codecs.palette.window import use_window
from palettelink.errors import InvalidRequest
from palettelink.front import Front, GraphChoice
from palettelink.image import Letterbox, letterbox


@dataclass
class Item:
    """One benchmark image, prepared once and shared by every method."""

    name: str
    rgb: np.ndarray
    x: np.ndarray  # letterboxed 1x3xSxS float32
    letterbox: Letterbox
    tensors: list[np.ndarray]  # uncompressed crossing tensors from the ONNX front

    @property
    def pixels(self) -> int:
        return self.letterbox.width * self.letterbox.height


def prepare(name: str, rgb: np.ndarray, front: Front) -> Item:
    x, lb = letterbox(rgb, front.bundle.input_size)
    return Item(name, rgb, x, lb, front.run_tensor(x))


@dataclass
class Output:
    """What a method produced: exactly one of ``tensors`` / ``rgb`` is set."""

    n_bytes: int
    tensors: list[np.ndarray] | None = None
    rgb: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    window: tuple[int, int, int, int] | None = None  # the letterbox's part ``tensors`` cover (None: all)


@dataclass
class Context:
    """What methods may use: the bundle and its ONNX front (the detector stays with the runner)."""

    bundle: Bundle
    front: Front
    options: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    name: str
    kind: str  # "features" or "image"

    def points(self) -> list[int]:
        """Rate points, best quality first (bits, quality, level …)."""
        ...

    def label(self, point: int) -> str: ...

    def run(self, item: Item, point: int) -> Output: ...


METHODS: dict[str, Callable[[Context], Method]] = {}


def register(name: str) -> Callable[[Callable[[Context], Method]], Callable[[Context], Method]]:
    """Add a benchmark method; a second one under a taken name is a bug (it would silently replace
    the first: the AVIF anchor once hid the AVIF codec), refused here."""
    def deco(factory: Callable[[Context], Method]) -> Callable[[Context], Method]:
        if name in METHODS:
            raise ValueError(f"benchmark method {name!r} is already registered")
        METHODS[name] = factory
        return factory

    return deco


def make_method(name: str, ctx: Context) -> Method:
    if name not in METHODS:
        raise InvalidRequest(f"unknown benchmark method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](ctx)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


@register("bypass")
class Bypass:
    """Uncompressed float32 crossing tensors (CompressAI-Vision's bypass codec): checks that the ONNX
    front + tail agree with the unsplit reference, and shows what a raw split costs."""

    name = "bypass"
    kind = "features"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def points(self) -> list[int]:
        return [32]

    def label(self, point: int) -> str:
        return "f32"

    def run(self, item: Item, point: int) -> Output:
        return Output(sum(t.nbytes for t in item.tensors), tensors=item.tensors)


class CodecMethod:
    """A feature codec of ``palettelink.codecs`` end to end: edge encoder → bytes → server decoder.

    Each image is analysed once and every level cut from that analysis. A codec whose cut is the
    crossing tensors starts from the item's front outputs (shared by every method); any other runs
    its own edge network once per image, reported apart as ``analyse_ms``.
    """

    kind = "features"

    def __init__(self, ctx: Context, codec: str) -> None:
        offered = codecs.available(ctx.bundle)
        if codec not in offered:
            raise InvalidRequest(f"bundle {ctx.bundle.id} has no {codec!r} codec (it has {offered}); "
                                 "rebuild it with `palettelink build-bundle`")
        self.name = codec_method_name(codec)
        self.spec = codecs.spec(codec)
        self.encoder = codecs.make_encoder(ctx.bundle, codec)
        self.decoder = codecs.Decoder(ctx.bundle)
        window = ctx.options.get("canvas") == "window" and use_window(self.encoder)
        served = ctx.options.get("server_precision", "fp32") == "auto"
        self._server_graph: GraphChoice | None = None
        if codec == PALETTE:
            # the server's own palette decoder: a window's latent decoded as it is (``auto`` also cuts a
            # square's window out, as the server does); ``auto`` at the server's precision (int8 where the
            # bundle kept it), else fp32 on what the edge sent
            from palettelink.models.windowed_palette import WindowedPaletteDecoder

            dec = WindowedPaletteDecoder(ctx.bundle, precision=None if served else "fp32",
                                         window=window or served)
            self.decoder = codecs.Decoder(ctx.bundle, overrides={codec: dec})
            self._server_graph = dec.graph
        wanted = ctx.options.get(f"{codec}_levels")
        self._points = list(wanted) if wanted else self.encoder.levels()  # finest first
        self._analysis: tuple[Item, codecs.Analysis, float] | None = None  # the last item, its analysis, ms

    def points(self) -> list[int]:
        return self._points

    def label(self, point: int) -> str:
        return self.spec.level_label(point)

    def _analyse(self, item: Item) -> tuple[codecs.Analysis, float]:
        if self._analysis is None or self._analysis[0] is not item:
            t0 = time.perf_counter()
            if self.spec.cut == "crossing":
                size = (item.letterbox.width, item.letterbox.height)
                analysis: codecs.Analysis = codecs.CrossingAnalysis(size, 0.0, item.tensors)
            else:
                analysis = self.encoder.analyse(item.rgb)
            self._analysis = (item, analysis, _ms(t0))
        return self._analysis[1], self._analysis[2]

    def server_graph(self) -> GraphChoice | None:
        """Which file ran this codec's server-side network (None: it has none)."""
        return self._server_graph

    def run(self, item: Item, point: int) -> Output:
        """``encode_ms`` is the codec's own work at this point; the edge network run shared by all
        levels of an image is ``analyse_ms`` (zero for a crossing-tensor codec: the item has them)."""
        analysis, analyse_ms = self._analyse(item)
        timings: dict[str, float] = {} if self.spec.cut == "crossing" else {"analyse_ms": analyse_ms}
        t0 = time.perf_counter()
        payload = self.encoder.encode_analysis(analysis, point).payload
        timings["encode_ms"] = _ms(t0)
        t0 = time.perf_counter()
        dec = self.decoder.decode(payload)
        timings["decode_ms"] = _ms(t0)
        return Output(len(payload), tensors=dec.tensors, timings_ms=timings, window=dec.window)


def _codec_method(codec: str) -> Callable[[Context], Method]:
    def make(ctx: Context) -> Method:
        return CodecMethod(ctx, codec)

    return make


# Image-format anchors are named by their format (rows jpeg, webp and avif in every committed
# report); a codec of the registry with a format's name gets "<name>-codec" rows instead.
ANCHOR_FORMATS = ("JPEG", "WEBP", "AVIF")
_ANCHOR_NAMES = {f.lower() for f in ANCHOR_FORMATS}


def codec_method_name(codec: str) -> str:
    """The benchmark method (and row) name of a registry codec."""
    return f"{codec}-codec" if codec in _ANCHOR_NAMES else codec


for _spec in codecs.specs():  # one benchmark row per registered codec
    register(codec_method_name(_spec.name))(_codec_method(_spec.name))


class PillowMethod:
    """An image codec anchor: code the *original* image, decode it, run the whole detector.

    ``downscale`` > 1: code the picture shrunk by that factor (area filter) and upscale the decoded
    one back (bicubic) before the detector: the honest anchor below the format's lowest quality,
    where a codec that only wins at rates AVIF cannot reach would otherwise win by default."""

    kind = "image"

    def __init__(self, ctx: Context, fmt: str, qualities: list[int], downscale: int = 1,
                 **save_args: Any) -> None:
        self.name = fmt.lower() + (f"-down{downscale}" if downscale > 1 else "")
        self.fmt = fmt
        self.downscale = int(downscale)
        self._points = list(ctx.options.get(f"{self.name}_qualities") or qualities)
        self.save_args = save_args

    def points(self) -> list[int]:
        return self._points

    def label(self, point: int) -> str:
        return f"q{point}"

    def run(self, item: Item, point: int) -> Output:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        src = Image.fromarray(item.rgb)
        if self.downscale > 1:
            w, h = src.size
            src = src.resize((max(1, w // self.downscale), max(1, h // self.downscale)), Image.Resampling.BOX)
        src.save(buf, format=self.fmt, quality=point, **self.save_args)
        data = buf.getvalue()
        enc_ms = _ms(t0)
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as im:
            out = im.convert("RGB")
            if self.downscale > 1:
                out = out.resize((item.rgb.shape[1], item.rgb.shape[0]), Image.Resampling.BICUBIC)
            rgb = np.asarray(out)
        return Output(len(data), rgb=rgb, timings_ms={"encode_ms": enc_ms, "decode_ms": _ms(t0)})


def _anchor(fmt: str, qualities: list[int], downscale: int = 1, **save_args: Any,
            ) -> Callable[[Context], Method]:
    def make(ctx: Context) -> Method:
        if fmt != "JPEG" and not features.check(fmt.lower()):
            raise InvalidRequest(f"this Pillow build has no {fmt} support (Pillow ≥ 11.3 wheels have AVIF)")
        return PillowMethod(ctx, fmt, qualities, downscale=downscale, **save_args)

    return make


register(ANCHOR_FORMATS[0].lower())(_anchor("JPEG", [90, 75, 50, 30, 20, 10, 5]))
register(ANCHOR_FORMATS[1].lower())(_anchor("WEBP", [90, 75, 50, 30, 10, 5, 0], method=4))
register(ANCHOR_FORMATS[2].lower())(_anchor("AVIF", [90, 75, 50, 30, 10, 0]))


for _f in (2, 4):  # below the formats' lowest quality: the picture at half and quarter size
    register(f"{ANCHOR_FORMATS[2].lower()}-down{_f}")(_anchor("AVIF", [30, 10, 0], downscale=_f))
    register(f"{ANCHOR_FORMATS[0].lower()}-down{_f}")(_anchor("JPEG", [50, 20, 5], downscale=_f))
