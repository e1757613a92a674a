"""Transport-neutral results of one frame, and what the edge reports with it (:class:`EdgeReport`).
The gRPC servicer and the HTTP app convert these; the task runners and the
:class:`~server.service.Service` produce them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EdgeReport:
    """What a client says about a frame: its timings (echoed into metrics) and the codec's novelty
    and fallback for it (echoed into the result, the dashboard and metrics)."""

    front_ms: float = 0.0
    encode_ms: float = 0.0
    capture_time_us: int = 0
    novelty: float = 0.0  # 0 = not measured
    fallback: str = ""


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int
    class_name: str
    score: float


@dataclass(frozen=True)
class Mask:
    """Run-length mask over the original image, row-major, starting with a run of zeros."""

    width: int
    height: int
    counts: tuple[int, ...]
    class_id: int = 0
    score: float = 0.0


@dataclass(frozen=True)
class LandmarkSet:
    points: tuple[tuple[float, float, float], ...]  # (x, y, visibility) in image pixels
    scheme: str = ""
    score: float = 0.0


@dataclass
class TaskOutput:
    """What a task runner returns for one frame."""

    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)
    landmarks: list[LandmarkSet] = field(default_factory=list)
    preview_jpeg: bytes = b""


@dataclass
class Timings:
    decode_ms: float = 0.0
    task_ms: float = 0.0
    queue_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class FrameResult:
    """One analysed frame: results plus what the bitstream said and what it cost."""

    frame_id: int
    bundle: str
    task: str
    codec: str
    level: int
    payload_bytes: int
    bpp: float
    truncated: bool
    image_width: int
    image_height: int
    output: TaskOutput
    timings: Timings
    batch_size: int = 1
    novelty: float = 0.0  # the edge's novelty for this frame (0 = not measured)
    fallback: str = ""  # what the edge's rate control did about a novel frame

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"]["preview_jpeg"] = len(self.output.preview_jpeg)  # bytes do not go into JSON
        return d
