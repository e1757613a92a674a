"""gRPC transport: a thin servicer over :class:`~server.service.Service`, plus the server around it
(health, reflection, auth, TLS, limits).

The servicer converts messages and calls the service; errors become statuses only through
``server/errors.py`` (the :func:`~server.errors.grpc_errors` decorator for whole calls,
:func:`~server.errors.status_of` for one bad frame inside a stream, which then goes on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from palettelink.errors import InvalidRequest, PaletteLinkError
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc
from server import __version__
from server.auth import TokenAuth
from server.errors import grpc_errors, status_of
from server.results import FrameResult
from server.service import EdgeReport, Service, check_name

log = logging.getLogger("palettelink.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PaletteLink"].full_name
MiB = 1 << 20


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
        image_width=r.image_width, image_height=r.image_height,
    )


def info_to_proto(service: Service) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(server_version=__version__, bundles=[
        pb.BundleInfo(
            name=b.name, version=b.version, table_hash=b.table_hash, tasks=b.tasks, class_names=b.class_names,
            input_size=b.input_size,
            codecs=[pb.CodecInfo(name=c.name, progressive=c.progressive, levels=[
                pb.LevelInfo(level=lv.level, palette_size=lv.palette_size, mean_bits=lv.mean_bits,
                             mean_bpp=lv.mean_bpp) for lv in c.levels]) for c in b.codecs],
            tensors=[pb.TensorInfo(name=t.name, layer=t.layer, shape=t.shape) for t in b.tensors],
        )
        for b in service.info()
    ])


def _authorization(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class PaletteLinkServicer(pb_grpc.PaletteLinkServicer):
    def __init__(self, service: Service, auth: TokenAuth | None = None) -> None:
        self.service = service
        self.metrics = service.metrics  # read by grpc_errors to count errors by status
        self.auth = auth or TokenAuth({})

    def _client(self, context: grpc.ServicerContext, claimed: str = "") -> str:
        """The token's client (already checked by the interceptor), else what the client claims."""
        who = self.auth.client_for(_authorization(context))
        check_name(claimed, "client_id")
        return f"{who}/{claimed}" if who and claimed and claimed != who else (who or claimed)

    @grpc_errors
    def Stream(self, request_iterator: Iterator[pb.StreamRequest],
               context: grpc.ServicerContext) -> Iterator[pb.StreamResponse]:
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "header":
            raise InvalidRequest("the first message of a Stream must be a StreamHeader")
        h = first.header
        with self.service.open_stream(h.bundle, h.task, self._client(context, h.client_id),
                                      h.want_preview) as session:
            for req in request_iterator:
                if req.WhichOneof("msg") != "frame":
                    raise InvalidRequest("a Stream carries one StreamHeader, then only Frames")
                f = req.frame
                edge = EdgeReport(f.edge_front_ms, f.edge_encode_ms, f.capture_time_us)
                try:
                    res = result_to_proto(session.analyze(f.frame_id, f.payload, edge))
                except Exception as e:  # this frame fails; the stream goes on
                    s = status_of(e, self.metrics)
                    res = pb.FrameResult(frame_id=f.frame_id, payload_bytes=len(f.payload),
                                         error=pb.FrameError(code=s.number, status=s.name, message=s.message))
                yield pb.StreamResponse(result=res)

    @grpc_errors
    def Analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> pb.AnalyzeResponse:
        r = self.service.analyze(request.bundle, request.task, request.payload, request.want_preview,
                                 client=self._client(context))
        return pb.AnalyzeResponse(result=result_to_proto(r))

    @grpc_errors
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        return info_to_proto(self.service)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid bearer token before they reach a handler. Health checks stay
    open so load balancers and kubelets can probe without credentials."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, auth: TokenAuth, metrics: Any) -> None:
        self.auth = auth
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if not self.auth.enabled or details.method.startswith(self.OPEN):
            return continuation(details)
        token = next((str(v) for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            self.auth.client_for(token)
        except PaletteLinkError as e:
            return _deny(continuation(details), status_of(e, self.metrics))
        return continuation(details)


def _deny(handler: Any, status: Any) -> Any:
    """A handler of the same shape as ``handler`` that only aborts with ``status``."""
    if handler is None:
        return None

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(status.grpc_code, status.message)

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key (PEM); with ``client_ca`` clients must present a certificate
    signed by it (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)


class GrpcServer:
    """The gRPC server of one :class:`Service`: PaletteLink + health + reflection.

    Each open Stream holds a worker thread, so the pool is sized to ``max_streams`` plus room for
    unary calls; beyond ``workers`` concurrent calls gRPC itself answers RESOURCE_EXHAUSTED.
    Health reports NOT_SERVING until :meth:`set_serving` (after the bundles are loaded).
    """

    def __init__(self, service: Service, *, host: str = "127.0.0.1", port: int = 0,
                 auth: TokenAuth | None = None, tls: TLSConfig | None = None,
                 max_message_bytes: int = 16 * MiB, workers: int | None = None) -> None:
        self.service = service
        self.host = host
        workers = workers or service.max_streams + 8
        auth = auth or TokenAuth({})
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            interceptors=[AuthInterceptor(auth, service.metrics)] if auth.enabled else [],
            maximum_concurrent_rpcs=workers,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # gRPC sets SO_REUSEPORT by default: a second server on the same port then bound too
                # and printed READY. Off, a taken port makes add_*_port return 0 (checked below).
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_PaletteLinkServicer_to_server(PaletteLinkServicer(service, auth), self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=ThreadPoolExecutor(max_workers=1))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), self.server)
        self.set_serving(False)
        address = f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, tls.credentials()) if tls
                     else self.server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.tls = tls is not None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        s = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, s)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, let running ones finish for ``grace`` seconds, then cancel them."""
        self.set_serving(False)
        self.server.stop(grace).wait(grace + 1)
