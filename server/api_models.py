"""Response models of the JSON APIs, so the OpenAPI schema (``/openapi.json``, ``/docs``) types them.

They describe what :class:`~server.service.Service` already returns; extra keys are allowed so that
a field added there never turns an answer into a validation error.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class BoxModel(_Open):
    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int
    class_name: str
    score: float


class MaskModel(_Open):
    """Run-length counts over the frame, row-major, starting with a run of zeros."""

    width: int
    height: int
    counts: list[int]
    class_id: int = 0
    score: float = 0.0


class LandmarksModel(_Open):
    points: list[list[float]]
    scheme: str = ""
    score: float = 0.0


class LevelModel(_Open):
    level: int
    palette_size: int = 0
    mean_bits: float = 0.0
    mean_bpp: float = 0.0


class CodecModel(_Open):
    name: str
    levels: list[LevelModel]
    progressive: bool = False


class TensorModel(_Open):
    name: str
    layer: int
    shape: list[int]


class BundleModel(_Open):
    name: str
    version: str
    table_hash: str
    tasks: list[str]
    class_names: list[str]
    codecs: list[CodecModel]
    tensors: list[TensorModel]
    input_size: int


class StreamModel(_Open):
    client: str
    bundle: str
    task: str
    opened: float
    frames: int
    bytes: int
    errors: int
    queued: int = 0
    refused: int = 0


class InfoModel(_Open):
    server_version: str
    ready: bool
    device: str
    uptime_s: float
    bundles: list[BundleModel]
    load_errors: dict[str, str]
    streams: list[StreamModel]
    queues: dict[str, int]
    draining: bool
    limits: dict[str, float]


class FrameErrorModel(_Open):
    status: str
    message: str


class FrameSummaryModel(_Open):
    """One entry of the recent-frames list: a success (codec … timings) or an ``error``. ``key``
    names the frame (and its picture at ``preview_url`` while the store holds it)."""

    key: int | None = None
    time: float
    client: str
    frame_id: int
    bundle: str
    task: str
    bytes: int
    codec: str | None = None
    level: int | None = None
    bpp: float | None = None
    truncated: bool | None = None
    novelty: float | None = None
    fallback: str | None = None
    image: list[int] | None = None
    boxes: int | None = None
    masks: int | None = None
    landmarks: int | None = None
    batch: int | None = None
    detections: list[list[str | float]] | None = None
    timings: dict[str, float] | None = None
    error: FrameErrorModel | None = None
    preview: bool = False
    preview_url: str | None = None


class LastFrameModel(_Open):
    """A stream's newest frame with what its task returned (bounded), and its picture if stored."""

    time: float
    key: int | None = None
    frame_id: int
    task: str | None = None
    codec: str
    level: int
    bytes: int
    bpp: float
    width: int
    height: int
    boxes: list[BoxModel]
    masks: list[MaskModel] = []
    landmarks: list[LandmarksModel] = []
    preview: bool = False
    preview_url: str | None = None


class StreamSeriesModel(_Open):
    kbit: list[float]
    level: list[int]


class StreamStatsModel(StreamModel):
    id: int
    codec: str | None = None
    level: int | None = None
    kbps: float | None = None
    fps: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    series: StreamSeriesModel
    last: LastFrameModel | None = None
    closed: float | None = None


class StreamsModel(_Open):
    open: list[StreamStatsModel]
    closed: list[StreamStatsModel]


class TryResultModel(_Open):
    codec: str
    level: int
    bytes: int
    bpp: float
    encode_ms: float
    server_ms: float
    target_bpp: float | None = None
    warning: str | None = None  # the target was below the coarsest level
    boxes: list[BoxModel]
    masks: list[MaskModel] = []
    landmarks: list[LandmarksModel] = []
    key: int | None = None  # the frame in /api/frames
    preview: bool = False
    preview_url: str | None = None  # the rebuilt picture (asked with want_preview)


class TryModel(_Open):
    """``/api/try``: the upload coded as asked, and the reference (uncompressed: baseline 8 bits)."""

    bundle: str
    task: str
    width: int
    height: int
    image_bytes: int
    result: TryResultModel
    reference: TryResultModel


class BenchPointModel(_Open):
    bpp: float
    ap50: float
    label: str = ""


class BenchCurveModel(_Open):
    method: str
    kind: str = ""
    points: list[BenchPointModel]


class BenchModel(_Open):
    source: str
    bundle: str = ""
    metric: str = ""
    images: int | None = None
    curves: list[BenchCurveModel]


class TaskOutputModel(_Open):
    boxes: list[BoxModel]
    masks: list[MaskModel] = []
    landmarks: list[LandmarksModel] = []
    preview_jpeg: int = 0  # its size in bytes (the bytes themselves are not in JSON)


class TimingsModel(_Open):
    decode_ms: float
    task_ms: float
    queue_ms: float
    total_ms: float


class AnalyzeModel(_Open):
    """``/api/analyze``: one frame's results, as the gRPC ``FrameResult``."""

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
    output: TaskOutputModel
    timings: TimingsModel
    batch_size: int = 1
    novelty: float = 0.0
    fallback: str = ""


class BundleRefModel(_Open):
    id: str
    name: str
    version: str
    table_hash: str
    edge: str


class BundlesModel(_Open):
    bundles: list[BundleRefModel]


class EdgeFileModel(_Open):
    path: str
    sha256: str
    size: int | None = None


class EdgeListingModel(_Open):
    id: str
    name: str
    version: str
    table_hash: str
    files: list[EdgeFileModel]
