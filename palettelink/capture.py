"""Frames from image files, folders, video files and (later) cameras, as RGB uint8 arrays.

All paths are checked before the first frame is read, so a typo fails at once with the path named,
not after minutes of streaming. An image's dimensions are checked from its header before it is
decoded (``palettelink.image.load_image``), a video's from its container before its first frame.
With ``on_error`` one unreadable or oversized input is reported and skipped, and the others go on.
OpenCV does the reading; nothing here imports torch.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from palettelink.errors import InvalidRequest, PaletteLinkError
from palettelink.image import IMAGE_SUFFIXES, VIDEO_SUFFIXES, check_size, load_image
from palettelink.samples import sample_images

_CAMERA = re.compile(r"^(?:camera|cam):(\d+)$")
SAMPLES = "samples:"  # the sample images that ship with the package


@dataclass(frozen=True)
class Source:
    """One input: ``kind`` is "image", "video" or "camera"; ``name`` is what the user sees."""

    kind: str
    name: str
    path: Path | None = None
    camera: int | None = None


@dataclass(frozen=True)
class Captured:
    """One frame. ``index`` counts frames within its source (0 for a still image)."""

    source: str
    kind: str
    index: int
    rgb: np.ndarray
    capture_time_us: int

    @property
    def label(self) -> str:
        """``bus.jpg`` for a still image, ``clip.avi#12`` for frame 12 of a video."""
        return self.source if self.kind == "image" else f"{self.source}#{self.index}"


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def expand(paths: Iterable[str]) -> list[Source]:
    """Resolve command-line inputs to sources; folders expand to their images and videos (sorted,
    recursive, hidden files skipped), ``samples:`` to the sample images that ship with the package
    (:mod:`palettelink.samples`). Raises :class:`InvalidRequest` naming every bad input."""
    out: list[Source] = []
    bad: list[str] = []
    for raw in paths:
        if raw == SAMPLES:
            found = sample_images()
            if not found:
                bad.append(f"{raw}: no sample images in this install")
            out.extend(Source("image", str(p), p) for p in found)
            continue
        m = _CAMERA.match(raw)
        if m:
            out.append(Source("camera", raw, camera=int(m.group(1))))
            continue
        p = Path(raw)
        if p.is_dir():
            found = [
                Source(k, str(f), f)
                for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and (k := _kind(f)) is not None
            ]
            if not found:
                bad.append(f"{raw}: folder holds no images or videos "
                           f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
            out.extend(found)
        elif p.is_file():
            k = _kind(p)
            if k is None:
                bad.append(f"{raw}: not an image or video file (unknown suffix {p.suffix!r})")
            else:
                out.append(Source(k, raw, p))
        else:
            bad.append(f"{raw}: no such file or folder")
    if bad:
        raise InvalidRequest(f"bad input path{'s' if len(bad) > 1 else ''}: " + "; ".join(bad))
    if not out:
        raise InvalidRequest("no input given")
    return out


def _now_us() -> int:
    return time.time_ns() // 1000


def _video_frames(src: Source, every: int) -> Generator[Captured, None, None]:
    cap = cv2.VideoCapture(str(src.path)) if src.path is not None else cv2.VideoCapture(int(src.camera or 0))
    if not cap.isOpened():
        raise InvalidRequest(f"cannot open {src.kind} {src.name}")
    try:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w > 0 and h > 0:
            check_size(f"{src.kind} {src.name}", w, h)
        index = 0
        got_any = False
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            got_any = True
            if index % every == 0:
                yield Captured(src.name, src.kind, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), _now_us())
            index += 1
        if not got_any:
            raise InvalidRequest(f"{src.kind} {src.name} yielded no frames (unsupported codec?)")
    finally:
        cap.release()


def iter_frames(sources: Iterable[Source], every: int = 1, max_frames: int | None = None,
                on_error: Callable[[Source, PaletteLinkError], None] | None = None) -> Iterator[Captured]:
    """Frames in order. ``every`` keeps every N-th frame of each video or camera; ``max_frames``
    caps the total over all sources (a camera otherwise never ends).

    A source that cannot be read (unreadable, too large, no frames) raises a
    :class:`~palettelink.errors.PaletteLinkError` naming it; with ``on_error`` it is handed to
    ``on_error(source, error)`` instead and the next source follows."""
    if every < 1:
        raise InvalidRequest(f"--every must be ≥ 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise InvalidRequest(f"--max-frames must be ≥ 1, got {max_frames}")
    n = 0
    for src in sources:
        if max_frames is not None and n >= max_frames:
            return
        if src.kind == "image":
            assert src.path is not None
            try:
                rgb = load_image(src.path)
            except PaletteLinkError as e:
                if on_error is None:
                    raise
                on_error(src, e)
                continue
            yield Captured(src.name, "image", 0, rgb, _now_us())
            n += 1
            continue
        frames = _video_frames(src, every)
        try:
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except PaletteLinkError as e:
                    if on_error is None:
                        raise
                    on_error(src, e)
                    break
                yield frame
                n += 1
                if max_frames is not None and n >= max_frames:
                    return
        finally:
            frames.close()  # release the capture device now, not at garbage collection
