"""Messages of the gRPC API from the service's results: a frame's result, ``GetInfo``'s answer, and
the answer of one frame that failed (with its low-cardinality metric labels). The servicer
(``server/grpc_service.py``) and a stream's request side (``server/grpc_inbox.py``) use them.
"""

from __future__ import annotations

from typing import Any

from palettelink import bitstream, codecs
from palettelink.v1 import palettelink_pb2 as pb
from server import __version__
from server.errors import status_of
from server.results import FrameResult
from server.service import Service


def result_to_proto(r: FrameResult) -> pb.FrameResult:
    o = r.output
    return pb.FrameResult(
        frame_id=r.frame_id,
        boxes=[pb.Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_id=b.class_id, class_name=b.class_name,
                      score=b.score) for b in o.boxes],
        masks=[pb.Mask(width=m.width, height=m.height, counts=list(m.counts), class_id=m.class_id,
                       score=m.score) for m in o.masks],
        landmarks=[pb.LandmarkSet(points=[pb.Landmark(x=x, y=y, visibility=v) for x, y, v in s.points],
                                  scheme=s.scheme, score=s.score) for s in o.landmarks],
        preview_jpeg=o.preview_jpeg,
        timings=pb.Timings(decode_ms=r.timings.decode_ms, task_ms=r.timings.task_ms,
                           queue_ms=r.timings.queue_ms, total_ms=r.timings.total_ms),
        payload_bytes=r.payload_bytes, bpp=r.bpp, codec=r.codec, level=r.level, truncated=r.truncated,
        image_width=r.image_width, image_height=r.image_height, novelty=r.novelty, fallback=r.fallback,
    )


def info_to_proto(service: Service) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(server_version=__version__, bundles=[
        pb.BundleInfo(
            name=b.name, version=b.version, table_hash=b.table_hash, tasks=b.tasks, class_names=b.class_names,
            input_size=b.input_size,
            codecs=[pb.CodecInfo(name=c.name, progressive=c.progressive, window_latent=c.window_latent,
                                 levels=[pb.LevelInfo(level=lv.level, palette_size=lv.palette_size,
                                                      mean_bits=lv.mean_bits, mean_bpp=lv.mean_bpp)
                                         for lv in c.levels]) for c in b.codecs],
            tensors=[pb.TensorInfo(name=t.name, layer=t.layer, shape=t.shape) for t in b.tensors],
        )
        for b in service.info()
    ])


def frame_labels(service: Service, bundle: str, payload: bytes) -> dict[str, str]:
    """Metric labels of a coded frame that failed, low-cardinality whatever the client sent: the id of
    a bundle loaded here, else ``unknown``; the codec its header's codec byte names, else ``unknown``
    (one byte read, no parsing: refusals under load come fast)."""
    try:
        bid = service.resolve(bundle).bundle.id
    except Exception:
        bid = "unknown"
    head = bytes(payload[:bitstream._FIXED.size])
    spec = (codecs.spec_for_wire_id(head[5]) if len(head) > 5 and head[:4] == bitstream.MAGIC else None)
    return {"bundle": bid, "codec": spec.name if spec else "unknown"}


def frame_error(f: pb.Frame, exc: BaseException, metrics: Any,
                labels: dict[str, str] | None = None) -> pb.FrameResult:
    """The answer of one frame that failed (the stream goes on), with its retry hint if any."""
    s = status_of(exc, metrics, labels)
    return pb.FrameResult(frame_id=f.frame_id, payload_bytes=len(f.payload),
                          error=pb.FrameError(code=s.number, status=s.name, message=s.message,
                                              retry_after_ms=s.retry_after_ms))
