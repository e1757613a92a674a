from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamHeader(_message.Message):
    __slots__ = ("client_id", "bundle", "task", "want_preview")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    WANT_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    bundle: str
    task: str
    want_preview: bool
    def __init__(self, client_id: _Optional[str] = ..., bundle: _Optional[str] = ..., task: _Optional[str] = ..., want_preview: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("frame_id", "payload", "edge_front_ms", "edge_encode_ms", "capture_time_us", "edge_novelty", "edge_fallback")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EDGE_FRONT_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    EDGE_NOVELTY_FIELD_NUMBER: _ClassVar[int]
    EDGE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    payload: bytes
    edge_front_ms: float
    edge_encode_ms: float
    capture_time_us: int
    edge_novelty: float
    edge_fallback: str
    def __init__(self, frame_id: _Optional[int] = ..., payload: _Optional[bytes] = ..., edge_front_ms: _Optional[float] = ..., edge_encode_ms: _Optional[float] = ..., capture_time_us: _Optional[int] = ..., edge_novelty: _Optional[float] = ..., edge_fallback: _Optional[str] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    frame: Frame
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "class_id", "class_name", "score")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int
    class_name: str
    score: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("width", "height", "counts", "class_id", "score")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    counts: _containers.RepeatedScalarFieldContainer[int]
    class_id: int
    score: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., counts: _Optional[_Iterable[int]] = ..., class_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class Landmark(_message.Message):
    __slots__ = ("x", "y", "visibility")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    visibility: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., visibility: _Optional[float] = ...) -> None: ...

class LandmarkSet(_message.Message):
    __slots__ = ("points", "scheme", "score")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Landmark]
    scheme: str
    score: float
    def __init__(self, points: _Optional[_Iterable[_Union[Landmark, _Mapping]]] = ..., scheme: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "task_ms", "queue_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    task_ms: float
    queue_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., task_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "status", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("frame_id", "boxes", "masks", "landmarks", "preview_jpeg", "timings", "payload_bytes", "bpp", "codec", "level", "truncated", "image_width", "image_height", "error", "novelty", "fallback")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_JPEG_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BPP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NOVELTY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    landmarks: _containers.RepeatedCompositeFieldContainer[LandmarkSet]
    preview_jpeg: bytes
    timings: Timings
    payload_bytes: int
    bpp: float
    codec: str
    level: int
    truncated: bool
    image_width: int
    image_height: int
    error: FrameError
    novelty: float
    fallback: str
    def __init__(self, frame_id: _Optional[int] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., landmarks: _Optional[_Iterable[_Union[LandmarkSet, _Mapping]]] = ..., preview_jpeg: _Optional[bytes] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., bpp: _Optional[float] = ..., codec: _Optional[str] = ..., level: _Optional[int] = ..., truncated: _Optional[bool] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., novelty: _Optional[float] = ..., fallback: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FrameResult
    def __init__(self, result: _Optional[_Union[FrameResult, _Mapping]] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("bundle", "task", "payload", "want_preview")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WANT_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    bundle: str
    task: str
    payload: bytes
    want_preview: bool
    def __init__(self, bundle: _Optional[str] = ..., task: _Optional[str] = ..., payload: _Optional[bytes] = ..., want_preview: _Optional[bool] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FrameResult
    def __init__(self, result: _Optional[_Union[FrameResult, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LevelInfo(_message.Message):
    __slots__ = ("level", "palette_size", "mean_bits", "mean_bpp")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PALETTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_BITS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BPP_FIELD_NUMBER: _ClassVar[int]
    level: int
    palette_size: int
    mean_bits: float
    mean_bpp: float
    def __init__(self, level: _Optional[int] = ..., palette_size: _Optional[int] = ..., mean_bits: _Optional[float] = ..., mean_bpp: _Optional[float] = ...) -> None: ...

class CodecInfo(_message.Message):
    __slots__ = ("name", "levels", "progressive", "window_latent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PROGRESSIVE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LATENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    levels: _containers.RepeatedCompositeFieldContainer[LevelInfo]
    progressive: bool
    window_latent: bool
    def __init__(self, name: _Optional[str] = ..., levels: _Optional[_Iterable[_Union[LevelInfo, _Mapping]]] = ..., progressive: _Optional[bool] = ..., window_latent: _Optional[bool] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "layer", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("name", "version", "table_hash", "tasks", "class_names", "codecs", "tensors", "input_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_HASH_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    table_hash: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    codecs: _containers.RepeatedCompositeFieldContainer[CodecInfo]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    input_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., table_hash: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., class_names: _Optional[_Iterable[str]] = ..., codecs: _Optional[_Iterable[_Union[CodecInfo, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., input_size: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("bundles", "server_version")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    server_version: str
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ..., server_version: _Optional[str] = ...) -> None: ...
