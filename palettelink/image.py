"""Image loading and the letterbox both sides agree on (numpy + OpenCV, no torch).

The network sees a square ``size``×``size`` RGB tensor in [0, 1], the image scaled to fit and padded
with grey 114 (ultralytics' convention). Boxes come back in original-image pixels.

An image file's dimensions are read from its header (Pillow reads only that) and checked before it is
decoded: a small PNG can declare 20,000×20,000 pixels, and OpenCV would decode all of it first. A
JPEG or PNG file cut short (a partial copy or download) is refused before OpenCV decodes it: OpenCV
would print a libjpeg warning and hand back a picture half grey, or print a libpng error.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from palettelink.bitstream import MAX_IMAGE_SIDE
from palettelink.errors import ImageTooLarge, InvalidRequest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v"}
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192²): 200 MB decoded, the server's default limit too


@dataclass(frozen=True)
class Letterbox:
    scale: float
    pad_x: int
    pad_y: int
    width: int  # original image size
    height: int

    def boxes_to_image(self, xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from network pixels back to the original image, clipped to it."""
        b = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.pad_x) / self.scale
        b[:, [1, 3]] = (b[:, [1, 3]] - self.pad_y) / self.scale
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.height)
        return b


def letterbox_info(width: int, height: int, size: int) -> Letterbox:
    scale = min(size / width, size / height)
    nw, nh = round(width * scale), round(height * scale)
    return Letterbox(scale, (size - nw) // 2, (size - nh) // 2, width, height)


@dataclass(frozen=True)
class Window:
    """Pixels [x0, x1) × [y0, y1) of the letterboxed square input, multiples of the alignment."""

    x0: int
    y0: int
    x1: int
    y1: int

    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    def cells(self, stride: int) -> tuple[slice, slice]:
        """(rows, columns) of a tensor at ``stride`` that this window covers."""
        return slice(self.y0 // stride, self.y1 // stride), slice(self.x0 // stride, self.x1 // stride)


def content_window(image_size: tuple[int, int], size: int, align: int) -> Window:
    """The part of the ``size``² letterbox that holds an image of ``image_size`` (W, H), widened to
    multiples of ``align`` (never empty)."""
    lb = letterbox_info(int(image_size[0]), int(image_size[1]), size)
    nw, nh = round(lb.width * lb.scale), round(lb.height * lb.scale)

    def span(pad: int, n: int) -> tuple[int, int]:
        a = max(0, (pad // align) * align)
        b = min(size, math.ceil((pad + n) / align) * align)
        if b <= a:  # a sliver (a 1×10000 picture): one cell
            a = min(a, size - align)
            b = a + align
        return a, b

    x0, x1 = span(lb.pad_x, nw)
    y0, y1 = span(lb.pad_y, nh)
    return Window(x0, y0, x1, y1)


def window_letterbox(lb: Letterbox, window: tuple[int, int, int, int] | None) -> Letterbox:
    """``lb`` for boxes found in ``window`` (x0, y0, x1, y1) of the letterbox rather than all of it."""
    if window is None:
        return lb
    return Letterbox(lb.scale, lb.pad_x - int(window[0]), lb.pad_y - int(window[1]), lb.width, lb.height)


def rgb_size(rgb: np.ndarray) -> tuple[int, int]:
    """(W, H) of an HxWx3 uint8 RGB image; InvalidRequest for anything else."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidRequest(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    return int(rgb.shape[1]), int(rgb.shape[0])


def letterbox(rgb: np.ndarray, size: int, image_size: tuple[int, int] | None = None,
              window: Window | None = None) -> tuple[np.ndarray, Letterbox]:
    """``rgb`` uint8 HxWx3 → float32 1x3xSxS in [0, 1] and the mapping back.

    ``image_size``: the (W, H) of the original when ``rgb`` is a smaller copy of it (a picture coded
    downscaled): the letterbox is the original's, the copy resized straight into its place (bicubic
    where it is enlarged). ``window``: only that part of the square (1x3x(y1-y0)x(x1-x0)), the same
    values as slicing the whole one: the edge converts only the pixels it runs, in one float copy
    (a third of its preparation time for a 640x480 frame)."""
    w, h = rgb_size(rgb)
    ow, oh = (w, h) if image_size is None else image_size
    info = letterbox_info(ow, oh, size)
    nw, nh = round(ow * info.scale), round(oh * info.scale)
    enlarged_copy = (ow, oh) != (w, h) and (nw > w or nh > h)
    how = cv2.INTER_CUBIC if enlarged_copy else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=how) if (nw, nh) != (w, h) else rgb
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    canvas[info.pad_y : info.pad_y + nh, info.pad_x : info.pad_x + nw] = resized
    if window is not None:
        canvas = canvas[window.y0 : window.y1, window.x0 : window.x1]
    x = np.empty((1, 3, *canvas.shape[:2]), dtype=np.float32)
    x[0] = canvas.transpose(2, 0, 1)
    np.divide(x, np.float32(255.0), out=x)  # x / 255 in float32, in place
    return x, info


def check_size(name: str | Path, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse ``width``×``height`` when a frame cannot carry it (a side over ``MAX_IMAGE_SIDE``) or it
    holds more than ``max_pixels`` pixels."""
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ImageTooLarge(f"image {name} is {width}x{height} pixels: a PaletteLink frame carries at most "
                            f"{MAX_IMAGE_SIDE} pixels a side")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image {name} is {width}x{height} = {width * height} pixels: more than the "
                            f"limit of {max_pixels}")


_HEADER_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")  # Pillow's ids for IMAGE_SUFFIXES


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(W, H) as the file's header declares it, without decoding a pixel; ``None`` when no header of
    the image formats is recognised (OpenCV, with its own pixel limit, then has the last word).

    Pillow's format plugins parse the header, called directly rather than through ``Image.open``:
    that applies Pillow's decompression-bomb limit before we can name the size, and in a process
    that imported ultralytics it is patched to install a HEIF plugin for files it does not know."""
    try:
        with open(path, "rb") as fp:
            return _header_size(fp, str(path))
    except OSError:
        return None


def _header_size(fp: BinaryIO, name: str) -> tuple[int, int] | None:
    Image.init()
    prefix = fp.read(16)
    for fmt in _HEADER_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(prefix) is not True):
            continue
        fp.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = factory(fp, name)
        except (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, struct.error):
            continue  # a broken header: let the next format (or OpenCV) try
        return int(im.size[0]), int(im.size[1])
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def truncation(path: str | Path) -> str | None:
    """Why the JPEG or PNG file at ``path`` is cut short, or None (complete, another format, or not
    readable here: the decoder has the last word). A PNG's chunks are walked to its IEND (lengths
    only, nothing inflated); a JPEG's entropy-coded data is run through libjpeg at 1/8 scale (Pillow's
    draft mode: about 2 ms for a 1080p frame), which notices a scan that stops early."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(8)
            if head == _PNG_SIGNATURE:
                return _png_truncation(fp)
            if head.startswith(b"\xff\xd8\xff"):
                return _jpeg_truncation(fp, str(path))
    except OSError:
        return None
    return None


def _png_truncation(fp: BinaryIO) -> str | None:
    size = fp.seek(0, io.SEEK_END)
    pos = len(_PNG_SIGNATURE)
    while True:
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8:
            return f"its data ends after {size} bytes, before the PNG's end chunk (IEND)"
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return None
        pos += 12 + length  # length, type, data, CRC
        if pos > size:
            return (f"its {kind.decode('latin-1')!r} chunk needs {pos - size} bytes more than the file's "
                    f"{size}")


def _jpeg_truncation(fp: BinaryIO, name: str) -> str | None:
    from PIL import ImageFile

    Image.init()
    factory, _ = Image.OPEN.get("JPEG", (None, None))
    if factory is None or ImageFile.LOAD_TRUNCATED_IMAGES:
        return None
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = factory(fp, name)
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except OSError as e:
        return "its JPEG data ends before the picture is complete" if "truncated" in str(e) else None
    except Exception:  # noqa: BLE001 - anything else Pillow cannot read: OpenCV may, or says so
        return None
    return None


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """:func:`load_image` for bytes in memory (an upload): the header is recognised and its size
    checked before any pixel is decoded; nothing touches the disk. Not an image of a known format:
    :class:`~palettelink.errors.InvalidRequest`."""
    size = _header_size(io.BytesIO(data), name)
    if size is None:
        raise InvalidRequest(f"{name} is not an image (PNG, JPEG, BMP, WebP or TIFF)")
    check_size(name, *size, max_pixels=max_pixels)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidRequest(f"cannot decode image {name}")
    check_size(name, bgr.shape[1], bgr.shape[0], max_pixels)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8; a clear error for anything unreadable or truncated, and
    :class:`~palettelink.errors.ImageTooLarge` (checked from the header, before decoding) for an image
    over ``max_pixels`` or wider or taller than a frame can carry."""
    size = image_size(path)
    if size is not None:
        check_size(path, *size, max_pixels=max_pixels)
    if (why := truncation(path)) is not None:
        raise InvalidRequest(f"image {path} is truncated (a partial copy or download?): {why}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidRequest(f"cannot read image {path}: not a PNG, JPEG, BMP, WebP or TIFF image OpenCV "
                             "can decode")
    check_size(path, bgr.shape[1], bgr.shape[0], max_pixels)  # what was decoded (EXIF may rotate it)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
