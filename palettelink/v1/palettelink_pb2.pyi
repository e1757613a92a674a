from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

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
    def __init__(self, client_id: str | None = ..., bundle: str | None = ..., task: str | None = ..., want_preview: bool | None = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("frame_id", "payload", "edge_front_ms", "edge_encode_ms", "capture_time_us")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EDGE_FRONT_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    payload: bytes
    edge_front_ms: float
    edge_encode_ms: float
    capture_time_us: int
    def __init__(self, frame_id: int | None = ..., payload: bytes | None = ..., edge_front_ms: float | None = ..., edge_encode_ms: float | None = ..., capture_time_us: int | None = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    frame: Frame
    def __init__(self, header: StreamHeader | _Mapping | None = ..., frame: Frame | _Mapping | None = ...) -> None: ...

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
    def __init__(self, x1: float | None = ..., y1: float | None = ..., x2: float | None = ..., y2: float | None = ..., class_id: int | None = ..., class_name: str | None = ..., score: float | None = ...) -> None: ...

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
    def __init__(self, width: int | None = ..., height: int | None = ..., counts: _Iterable[int] | None = ..., class_id: int | None = ..., score: float | None = ...) -> None: ...

class Landmark(_message.Message):
    __slots__ = ("x", "y", "visibility")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    visibility: float
    def __init__(self, x: float | None = ..., y: float | None = ..., visibility: float | None = ...) -> None: ...

class LandmarkSet(_message.Message):
    __slots__ = ("points", "scheme", "score")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Landmark]
    scheme: str
    score: float
    def __init__(self, points: _Iterable[Landmark | _Mapping] | None = ..., scheme: str | None = ..., score: float | None = ...) -> None: ...

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
    def __init__(self, decode_ms: float | None = ..., task_ms: float | None = ..., queue_ms: float | None = ..., total_ms: float | None = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    def __init__(self, code: int | None = ..., status: str | None = ..., message: str | None = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("frame_id", "boxes", "masks", "landmarks", "preview_jpeg", "timings", "payload_bytes", "bpp", "codec", "level", "truncated", "image_width", "image_height", "error")
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
    def __init__(self, frame_id: int | None = ..., boxes: _Iterable[Box | _Mapping] | None = ..., masks: _Iterable[Mask | _Mapping] | None = ..., landmarks: _Iterable[LandmarkSet | _Mapping] | None = ..., preview_jpeg: bytes | None = ..., timings: Timings | _Mapping | None = ..., payload_bytes: int | None = ..., bpp: float | None = ..., codec: str | None = ..., level: int | None = ..., truncated: bool | None = ..., image_width: int | None = ..., image_height: int | None = ..., error: FrameError | _Mapping | None = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FrameResult
    def __init__(self, result: FrameResult | _Mapping | None = ...) -> None: ...

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
    def __init__(self, bundle: str | None = ..., task: str | None = ..., payload: bytes | None = ..., want_preview: bool | None = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FrameResult
    def __init__(self, result: FrameResult | _Mapping | None = ...) -> None: ...

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
    def __init__(self, level: int | None = ..., palette_size: int | None = ..., mean_bits: float | None = ..., mean_bpp: float | None = ...) -> None: ...

class CodecInfo(_message.Message):
    __slots__ = ("name", "levels", "progressive")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PROGRESSIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    levels: _containers.RepeatedCompositeFieldContainer[LevelInfo]
    progressive: bool
    def __init__(self, name: str | None = ..., levels: _Iterable[LevelInfo | _Mapping] | None = ..., progressive: bool | None = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "layer", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: str | None = ..., layer: int | None = ..., shape: _Iterable[int] | None = ...) -> None: ...

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
    def __init__(self, name: str | None = ..., version: str | None = ..., table_hash: str | None = ..., tasks: _Iterable[str] | None = ..., class_names: _Iterable[str] | None = ..., codecs: _Iterable[CodecInfo | _Mapping] | None = ..., tensors: _Iterable[TensorInfo | _Mapping] | None = ..., input_size: int | None = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("bundles", "server_version")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    server_version: str
    def __init__(self, bundles: _Iterable[BundleInfo | _Mapping] | None = ..., server_version: str | None = ...) -> None: ...
