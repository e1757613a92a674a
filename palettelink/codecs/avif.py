"""AVIF codec: the picture itself, coded with Pillow's AVIF (libavif), one layer per frame.

The reference any learned codec has to beat, offered through the same stream, rate control, server
and dashboard as the others (issue 16): the edge runs no network at all, it codes the *original*
picture; the server decodes it, letterboxes it exactly as the edge front would
(:func:`palettelink.image.letterbox`) and runs the bundle's ``front.onnx``, so ``Decoded.tensors`` are
the crossing tensors every task tail already takes (a split detector's P3/P4/P5; the image bundle's
picture, its front being the identity). Offered by every bundle with a front, after palette and
baseline in preference, except that it is **the image bundles' default** (:func:`default_for`): on the
image codec's leave-source-out set (``docs/results/tasks-lso``) the palette image codec reaches detect
AP50 0.9 and pose OKS 0.95 at no lower rate than AVIF (downscaled rungs included), nor segment mIoU 0.9
at any level, so the product leads with what measures better; ``--codec palette`` still selects it.

Levels are a ladder, finest first (:data:`LADDER`): AVIF quality 75 down to 0 on the picture as it
is, then the picture downscaled by 2 and by 4 on each side (area filter; the server enlarges it back
into the letterbox, bicubic): the honest rungs below quality 0, where a codec that wins only at rates
AVIF cannot reach would otherwise win by default. Labels say both: ``q30``, ``q20/2`` (quality 20 of
the picture at half size), ``q0/4``.

Rate control gets exact sizes by coding every level once per frame (kept in the analysis, so the level
sent is not coded twice). Encoder speed is the trade: the full-size rungs use libavif speed 8, the
downscaled ones (a quarter and a sixteenth of the pixels, the rungs that compete at the lowest rates)
Pillow's default 6, like the bench's AVIF anchors. Measured on bus, zidane and three scikit-image
pictures against speed 6 (PSNR BD-rate over q75..q0): speed 8 costs 8-20 % more bytes for 3-4x less
time, speed 10 11-40 % for 10x less. On 2 cores shared with a training job the whole ladder of a
640x480 frame took 0.3-0.6 s, of a 1 MP frame 0.6-1.3 s; one fixed level (``--level``) a sixth of that.

Frame::

    codec 3 | param = level | no flags | one tensor (3, h, w): the coded picture's size | one layer: AVIF

The server refuses, before decoding a pixel: a level not in the ladder, a declared picture size that
is not the level's size of the frame's image size (:func:`coded_size`), and an AVIF whose header
(parsed by libavif, no pixel decoded) declares another size, several frames, or cannot be parsed.
Anything libavif then fails to decode is an :class:`~palettelink.errors.InvalidStream` too. The frame's
image size was already checked against the container's and the server's pixel limits, and a picture
over the container's tensor limit (5.6 M pixels: 3·h·w ≤ ``MAX_TENSOR_VALUES``) is coded shrunk to fit.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from palettelink import bitstream
from palettelink.bundle import Bundle
from palettelink.codecs import Analysis, CodecSpec, Decoded, Encoded, register
from palettelink.errors import BundleError, InvalidRequest, InvalidStream
from palettelink.front import Front
from palettelink.image import letterbox, rgb_size

try:  # Pillow ≥ 11.3 wheels carry libavif; named here so one-file builds (PyInstaller) collect it
    from PIL import AvifImagePlugin
except ImportError:  # pragma: no cover - an older Pillow: the codec is not offered
    AvifImagePlugin = None  # type: ignore[assignment]

CODEC = "avif"
WIRE_ID = 3  # the container's codec byte: never renumber (committed streams must decode)


@dataclass(frozen=True)
class Rung:
    """One level: AVIF ``quality`` (0..100) of the picture shrunk ``downscale`` times on each side,
    coded at libavif ``speed`` (0 slowest .. 10 fastest)."""

    quality: int
    downscale: int
    speed: int

    @property
    def label(self) -> str:
        return f"q{self.quality}" + (f"/{self.downscale}" if self.downscale > 1 else "")


LADDER = (Rung(75, 1, 8), Rung(50, 1, 8), Rung(30, 1, 8), Rung(20, 1, 8), Rung(10, 1, 8), Rung(0, 1, 8),
          Rung(20, 2, 6), Rung(0, 2, 6), Rung(20, 4, 6), Rung(0, 4, 6))
LEVELS = tuple(range(len(LADDER)))  # 0 = q75 (finest) … 9 = q0 of the picture at a quarter size
DEFAULT_LEVEL = 2  # q30: no task of the fall bench lost more than 3 % there (README, bench-eval)
MAX_PICTURE_PIXELS = bitstream.MAX_TENSOR_VALUES // 3  # one (3, h, w) tensor of the container


def supported() -> bool:
    """Whether this Pillow can code AVIF."""
    return AvifImagePlugin is not None and bool(AvifImagePlugin.SUPPORTED)


def front_file(bundle: Bundle) -> str:
    return str((bundle.manifest.get("front") or {}).get("file", "front.onnx"))


def offered(bundle: Bundle) -> bool:
    return supported() and bundle.has_file(front_file(bundle))


# Bundle families whose default codec this is, by measurement (bench-tasks --eval-set, the verdict of
# palettelink/bench/tasks_report.py): the image family, where the palette image codec loses (module doc).
DEFAULT_FOR_FAMILIES = ("image",)


def default_for(bundle: Bundle) -> bool:
    """Whether AVIF is ``bundle``'s default codec (an image bundle: see :data:`DEFAULT_FOR_FAMILIES`)."""
    return str(bundle.manifest.get("family", "")) in DEFAULT_FOR_FAMILIES


def _check_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or int(level) not in LEVELS:
        raise InvalidRequest(f"avif level must be one of {list(LEVELS)} "
                             f"({', '.join(r.label for r in LADDER)}), got {level}")
    return int(level)


def level_label(level: int) -> str:
    return LADDER[level].label if 0 <= level < len(LADDER) else f"L{level}"


def coded_size(image_size: tuple[int, int], downscale: int) -> tuple[int, int]:
    """(w, h) the edge codes a (W, H) picture at for a rung shrinking it ``downscale`` times: the
    sides divided (at least 1 pixel), then shrunk to the container's tensor limit if still over it.
    The server expects exactly this size (anything else is refused before decoding)."""
    w, h = (max(1, int(s) // downscale) for s in image_size)
    if w * h > MAX_PICTURE_PIXELS:
        s = math.sqrt(MAX_PICTURE_PIXELS / (w * h))
        w, h = max(1, math.floor(w * s)), max(1, math.floor(h * s))
    return w, h


def encode_picture(rgb: np.ndarray, rung: Rung) -> bytes:
    """The AVIF file of ``rgb`` (HxWx3 uint8) at ``rung``, shrunk (area filter) to :func:`coded_size`."""
    h, w = rgb.shape[:2]
    cw, ch = coded_size((w, h), rung.downscale)
    if (cw, ch) != (w, h):
        rgb = cv2.resize(rgb, (cw, ch), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="AVIF", quality=rung.quality,
                                                    speed=rung.speed)
    return buf.getvalue()


def decode_picture(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The RGB picture of an AVIF file that must be exactly ``size`` = (w, h): its header is parsed
    (libavif; no pixel decoded) and checked first. Anything else is :class:`InvalidStream`."""
    if AvifImagePlugin is None or not AvifImagePlugin.SUPPORTED:
        raise InvalidStream("this server's Pillow cannot decode AVIF")
    if not AvifImagePlugin._accept(data[:16]):
        raise InvalidStream("the avif layer is not an AVIF file (no AVIF 'ftyp' box)")
    try:  # the plugin itself: Image.open would apply Pillow's bomb limit or another plugin first
        im = AvifImagePlugin.AvifImageFile(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - libavif's parse errors come as several types
        raise InvalidStream(f"the avif layer is not a readable AVIF file: {e}") from e
    with im:
        if tuple(im.size) != tuple(size):
            raise InvalidStream(f"the AVIF header declares {im.size[0]}x{im.size[1]} pixels; this frame "
                                f"carries a {size[0]}x{size[1]} picture")
        if getattr(im, "n_frames", 1) != 1:
            raise InvalidStream(f"the AVIF holds {im.n_frames} frames; a frame carries one picture")
        try:
            rgb = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a corrupt payload fails inside libavif's decode
            raise InvalidStream(f"the AVIF picture does not decode: {e}") from e
    if rgb.shape != (size[1], size[0], 3):
        raise InvalidStream(f"the AVIF decoded to {rgb.shape}, not {size[0]}x{size[1]} RGB")
    return rgb


@dataclass
class AvifAnalysis(Analysis):
    """The picture, kept for coding any rung; each level's payload once made (rate control sizes
    every level, then sends one of them)."""

    rgb: np.ndarray
    coded: dict[int, bytes] = field(default_factory=dict)
    encode_ms: float = 0.0


class AvifEncoder:
    """Edge: no network; the original picture coded with Pillow's AVIF at the level's rung."""

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        if not supported():
            raise BundleError("this Pillow has no AVIF support (Pillow ≥ 11.3 wheels have it)")
        self.bundle = bundle

    def levels(self) -> list[int]:
        return list(LEVELS)

    def default_level(self) -> int:
        return DEFAULT_LEVEL

    def analyse(self, rgb: np.ndarray) -> AvifAnalysis:
        return AvifAnalysis(rgb_size(rgb), 0.0, rgb)

    def _frame(self, analysis: AvifAnalysis, level: int, data: bytes) -> bytes:
        w, h = coded_size(analysis.image_size, LADDER[level].downscale)
        return bitstream.pack(bitstream.Frame(
            codec_id=WIRE_ID, param=level, bundle_id=self.bundle.id, table_hash=self.bundle.table_hash,
            image_size=analysis.image_size, shapes=((3, h, w),), layers=(data,)))

    def _coded(self, analysis: Analysis, level: int) -> bytes:
        if not isinstance(analysis, AvifAnalysis):
            raise InvalidRequest(f"the avif codec codes its own analysis, not a {type(analysis).__name__}")
        if level not in analysis.coded:
            t0 = time.perf_counter()
            data = encode_picture(analysis.rgb, LADDER[level])
            analysis.coded[level] = self._frame(analysis, level, data)
            analysis.encode_ms += (time.perf_counter() - t0) * 1e3
        return analysis.coded[level]

    def level_sizes(self, analysis: Analysis) -> dict[int, int]:
        """Exact, by coding every level (kept in the analysis: the one sent is not coded twice)."""
        return {lv: len(self._coded(analysis, lv)) for lv in LEVELS}

    def encode_analysis(self, analysis: Analysis, level: int | None = None) -> Encoded:
        """``encode_ms`` counts all coding done on this analysis (sizing every level included)."""
        level = _check_level(DEFAULT_LEVEL if level is None else level)
        payload = self._coded(analysis, level)
        assert isinstance(analysis, AvifAnalysis)
        return Encoded(payload, CODEC, level, analysis.image_size,
                       {"front_ms": 0.0, "encode_ms": analysis.encode_ms})

    def encode(self, rgb: np.ndarray, level: int | None = None) -> Encoded:
        level = _check_level(DEFAULT_LEVEL if level is None else level)
        return self.encode_analysis(self.analyse(rgb), level)


class AvifDecoder:
    """Server: AVIF → the picture → the edge front's letterbox → ``front.onnx`` → crossing tensors."""

    codec = CODEC

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.front = Front(bundle, threads, file=front_file(bundle))
        self.shapes = [t.shape for t in bundle.tensors]

    def check_frame(self, frame: bitstream.Frame) -> tuple[int, int]:
        """Everything but the AVIF's own header: → the (w, h) the picture must have."""
        if frame.codec_id != WIRE_ID:
            raise InvalidStream(f"frame codec id {frame.codec_id} is not {CODEC!r}'s ({WIRE_ID})")
        if frame.param not in LEVELS:
            raise InvalidStream(f"avif level {frame.param} outside {list(LEVELS)}")
        if frame.progressive or frame.codec_flags or frame.truncated:
            raise InvalidStream("avif frames are whole and carry no flags (progressive/codec flags set, "
                                "or layers cut off)")
        if len(frame.layers) != 1 or len(frame.shapes) != 1:
            raise InvalidStream(f"an avif frame carries one picture in one layer, not {len(frame.shapes)} "
                                f"tensor(s) in {len(frame.layers)} layer(s)")
        w, h = coded_size(frame.image_size, LADDER[frame.param].downscale)
        if tuple(frame.shapes[0]) != (3, h, w):
            raise InvalidStream(f"avif level {frame.param} of a {frame.image_size[0]}x{frame.image_size[1]} "
                                f"image is a {w}x{h} picture; the frame declares {frame.shapes[0]}")
        return w, h

    def picture(self, frame: bitstream.Frame) -> np.ndarray:
        """The frame's picture as coded (HxWx3 uint8; a downscaled level's is smaller than the image),
        everything checked before a pixel is decoded."""
        return decode_picture(frame.layers[0], self.check_frame(frame))

    def decode_frame(self, frame: bitstream.Frame, n_bytes: int) -> Decoded:
        t0 = time.perf_counter()
        rgb = self.picture(frame)
        x, _ = letterbox(rgb, self.bundle.input_size, frame.image_size)
        t1 = time.perf_counter()
        tensors = [np.asarray(t, dtype=np.float32) for t in self.front.run_tensor(x)]
        t2 = time.perf_counter()
        got = [tuple(t.shape[1:]) for t in tensors]
        if got != self.shapes:
            raise BundleError(f"{self.bundle.id}: {front_file(self.bundle)} made tensors {got}, the "
                              f"manifest says {self.shapes}")
        return Decoded(tensors, CODEC, frame.param, frame.image_size, n_bytes,
                       timings_ms={"decode_ms": (t1 - t0) * 1e3, "front_ms": (t2 - t1) * 1e3})


SPEC = register(CodecSpec(
    name=CODEC, wire_id=WIRE_ID, param="level", label=level_label, progressive=False, exact_sizes=True,
    cut="picture", levels=lambda bundle: list(LEVELS), offered=offered, encoder=AvifEncoder,
    decoder=AvifDecoder, preference=95, default_for=default_for,
))
