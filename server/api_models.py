"""Response models of the JSON APIs, so the OpenAPI schema (``/openapi.json``, ``/docs``) types them.

The results of a frame (``server/results.py``) and what ``GetInfo`` says of a bundle
(``server/info.py``) are defined once, as the dataclasses the service returns; their models here are
made from those (:func:`model_of`), field by field, so a field added there is in the schema too. The
rest describe the JSON the service and the dashboard build as dicts. Extra keys are allowed so that a
field added there never turns an answer into a validation error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from server.info import BundleInfo, CodecInfo, LevelInfo, TensorInfo
from server.results import Box, FrameResult, LandmarkSet, Mask, TaskOutput, Timings


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


_MODELS: dict[type, type[_Open]] = {}  # result type → its model, for the fields that hold one


def _json_type(tp: Any) -> Any:
    """The type of a field as JSON carries it: a result type becomes its model (made first), a tuple
    an array of its items' type."""
    if isinstance(tp, type) and tp in _MODELS:
        return _MODELS[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple:
        (item,) = {_json_type(a) for a in args if a is not Ellipsis}  # one item type: an array
        return list[item]  # type: ignore[valid-type]
    if origin is list:
        return list[_json_type(args[0])]  # type: ignore[misc]
    return tp


def model_of(cls: type, name: str, doc: str | None = None, required: tuple[str, ...] | bool = (),
             **override: tuple[Any, Any]) -> type[_Open]:
    """The response model of the dataclass ``cls``: its fields in its order, each with its type as JSON
    carries it and its default. ``doc``: the schema's description; ``required``: fields the schema
    lists as required although ``cls`` gives them a default (``True``: all); ``override``: a field's
    (type, default) where JSON carries it differently."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in override:
            fields[f.name] = override[f.name]
            continue
        if required is True or f.name in required:  # type: ignore[operator]
            default: Any = ...
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (_json_type(hints[f.name]), default)
    model = create_model(name, __base__=_Open, __doc__=doc, __module__=__name__, **fields)
    _MODELS[cls] = model
    return model


BoxModel = model_of(Box, "BoxModel")
MaskModel = model_of(Mask, "MaskModel",
                     doc="Run-length counts over the frame, row-major, starting with a run of zeros.")
LandmarksModel = model_of(LandmarkSet, "LandmarksModel")
# The picture is not in JSON, its size in bytes is (FrameResult.to_dict). Every answer carries the
# boxes and the four timings, so the schema lists them as required whatever their defaults in Python.
TaskOutputModel = model_of(TaskOutput, "TaskOutputModel", required=("boxes",), preview_jpeg=(int, 0))
TimingsModel = model_of(Timings, "TimingsModel", required=True)
AnalyzeModel = model_of(FrameResult, "AnalyzeModel",
                        doc="``/api/analyze``: one frame's results, as the gRPC ``FrameResult``.")
LevelModel = model_of(LevelInfo, "LevelModel")
CodecModel = model_of(CodecInfo, "CodecModel")
TensorModel = model_of(TensorInfo, "TensorModel")
BundleModel = model_of(BundleInfo, "BundleModel")


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
