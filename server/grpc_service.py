"""gRPC transport: a thin servicer over :class:`~server.service.Service`, plus the server around it
(health, reflection, auth, TLS, limits).

The servicer converts messages (``server/grpc_convert.py``) and calls the service; a Stream's requests
are read by its :class:`~server.grpc_inbox.Inbox`; the interceptors and the worker pool are in
``server/grpc_interceptors.py``. Errors become statuses only through ``server/errors.py`` (the
:func:`~server.errors.grpc_errors` decorator for whole calls, :func:`~server.errors.status_of` for one
bad frame inside a stream, which then goes on).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from palettelink.errors import InvalidRequest, ResourceExhausted
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc
from server import reflection
from server.auth import TokenAuth
from server.errors import check_name, grpc_errors
from server.grpc_convert import frame_error, frame_labels, info_to_proto, result_to_proto
from server.grpc_inbox import WAKE, Inbox, StreamIdle
from server.grpc_interceptors import (
    HEADROOM,
    MIN_HEADROOM,
    AuthInterceptor,
    MetricsInterceptor,
    WorkerLimit,
    WorkerPool,
)
from server.results import EdgeReport
from server.service import Service
from server.sessions import StreamSession

log = logging.getLogger("palettelink.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PaletteLink"].full_name
MiB = 1 << 20
BACKSTOP = 8  # gRPC's own concurrent-call limit, in workers (WorkerLimit refuses long before)


def _authorization(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class PaletteLinkServicer(pb_grpc.PaletteLinkServicer):
    def __init__(self, service: Service, auth: TokenAuth | None = None, max_unary: int = 12) -> None:
        self.service = service
        self.metrics = service.metrics  # read by grpc_errors to count errors by status
        self.auth = auth or TokenAuth({})
        # Analyze calls in flight at once: with the streams, they never take the last free workers
        # (kept for health checks and GetInfo).
        self._unary = threading.BoundedSemaphore(max(1, max_unary))
        self.max_unary = max(1, max_unary)

    def _client(self, context: grpc.ServicerContext, claimed: str = "") -> str:
        """The token's client (already checked by the interceptor), else what the client claims."""
        who = self.auth.client_for(_authorization(context))
        check_name(claimed, "client_id")
        return f"{who}/{claimed}" if who and claimed and claimed != who else (who or claimed)

    @grpc_errors
    def Stream(self, request_iterator: Iterator[pb.StreamRequest],
               context: grpc.ServicerContext) -> Iterator[pb.StreamResponse]:
        svc, m = self.service, self.metrics
        who = self.auth.client_for(_authorization(context))
        # A slot is taken before the header is read (keyed by the token's client, else the peer), so
        # header-less and idle streams count against the limits too and never fill the worker pool.
        slot = who or _peer_host(context)
        try:
            svc.slots.acquire(slot)
        except ResourceExhausted:
            m.streams_refused.labels("limit").inc()
            raise
        inbox = Inbox(request_iterator, svc)
        try:
            first = inbox.get(svc.header_timeout)
            if first is None:
                context.set_code(grpc.StatusCode.OK)  # the edge closed the stream: counted ok
                return
            if first.WhichOneof("msg") != "header":
                raise InvalidRequest("the first message of a Stream must be a StreamHeader")
            h = first.header
            client = self._client(context, h.client_id)
            key = who or h.client_id or slot
            with svc.open_stream(h.bundle, h.task, client, h.want_preview, slot=slot,
                                 limit_key=key) as session:
                slot = key
                inbox.session = session
                try:
                    for answer in self._frames(inbox, session):
                        # An answer yielded while the call is already gone never reaches the client.
                        inbox.undelivered = not context.is_active()
                        yield answer
                except (grpc.RpcError, GeneratorExit):
                    # The client went away (an RpcError while the stream waited for its next frame,
                    # GeneratorExit at a yield) with every frame it sent answered: it closed the stream
                    # (the edge half-closes and then cancels as soon as its last answer is in, which can
                    # reach the server in either order), unless its deadline passed or the server
                    # itself is stopping. With frames of it still queued, in a task or answered after
                    # it left: CANCELLED.
                    if inbox.idle() and context.time_remaining() > 0 and not svc.draining:
                        context.set_code(grpc.StatusCode.OK)
                    raise
            # The edge closed its side and every frame got its answer: a clean close, counted OK even
            # if the client tears the call down before it reads the status.
            context.set_code(grpc.StatusCode.OK)
        except StreamIdle as e:
            m.streams_closed.labels(e.reason).inc()
            raise
        finally:
            inbox.close()
            svc.slots.release(slot)

    def _frames(self, inbox: Inbox, session: StreamSession) -> Iterator[pb.StreamResponse]:
        while True:
            yield from inbox.refusals()
            item = inbox.get(self.service.stream_idle_timeout, idle="frame")
            admitted = inbox.last_admitted
            if item is None:
                yield from inbox.refusals()
                return
            if item is WAKE:
                continue
            if item.WhichOneof("msg") != "frame":  # (not admitted: only frames are counted)
                raise InvalidRequest("a Stream carries one StreamHeader, then only Frames")
            f = item.frame
            edge = EdgeReport(f.edge_front_ms, f.edge_encode_ms, f.capture_time_us, f.edge_novelty,
                              f.edge_fallback)
            try:
                res = result_to_proto(session.analyze(f.frame_id, f.payload, edge, admitted=admitted))
            except Exception as e:  # this frame fails; the stream goes on
                res = frame_error(f, e, self.metrics, frame_labels(self.service, session.bundle, f.payload))
            finally:
                if admitted:
                    inbox.done_one()
            yield pb.StreamResponse(result=res)

    @grpc_errors
    def Analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> pb.AnalyzeResponse:
        if not self._unary.acquire(blocking=False):
            self.metrics.refused.labels("unary_calls").inc()
            ms = self.service.admission.retry_after_ms()
            raise ResourceExhausted(f"{self.max_unary} Analyze calls already in flight; use a Stream "
                                    f"or retry after {ms} ms", ms)
        try:
            client = self._client(context)
            r = self.service.analyze(request.bundle, request.task, request.payload, request.want_preview,
                                     client=client, admission_key=client or _peer_host(context))
        finally:
            self._unary.release()
        return pb.AnalyzeResponse(result=result_to_proto(r))

    def error_labels(self, method: str, request: Any) -> dict[str, str] | None:
        """Labels of a failed call that carried one coded frame (read by :func:`grpc_errors`)."""
        return frame_labels(self.service, request.bundle, request.payload) if method == "Analyze" else None

    @grpc_errors
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        return info_to_proto(self.service)


def _peer_host(context: grpc.ServicerContext) -> str:
    """``ipv4:1.2.3.4`` of ``ipv4:1.2.3.4:5678`` (the port changes with every connection)."""
    peer = str(context.peer() or "unknown")
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


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

    Each open Stream holds a worker thread (from its first byte on, header or not), so the pool is
    sized to ``max_streams`` plus :data:`HEADROOM` for unary calls and health checks; the stream
    limits (:class:`~server.admission.StreamSlots`) refuse streams before the pool is full; when other
    calls fill it, :class:`WorkerLimit` refuses with a retry hint naming ``--workers``.
    Health reports NOT_SERVING until :meth:`set_serving` (after the bundles are loaded).
    """

    def __init__(self, service: Service, *, host: str = "127.0.0.1", port: int = 0,
                 auth: TokenAuth | None = None, tls: TLSConfig | None = None,
                 max_message_bytes: int = 16 * MiB, workers: int | None = None) -> None:
        self.service = service
        self.host = host
        if workers is not None and workers < service.max_streams + MIN_HEADROOM:
            raise ValueError(f"--workers {workers} leaves no room beside --max-streams "
                             f"{service.max_streams}: give at least {service.max_streams + MIN_HEADROOM} "
                             "(unary calls and health checks need free workers)")
        workers = workers or service.max_streams + HEADROOM
        auth = auth or TokenAuth({})
        self.pool = WorkerPool(workers)
        self.worker_limit = WorkerLimit(self.pool, workers, service.metrics, service.admission.retry_after_ms)
        self.server = grpc.server(
            self.pool,
            interceptors=[MetricsInterceptor(service.metrics)]
            + ([AuthInterceptor(auth, service.metrics)] if auth.enabled else []) + [self.worker_limit],
            # WorkerLimit refuses at `workers` with a hint; gRPC's own limit (no hint, no flag named)
            # is only a backstop for a flood its refusal pool cannot keep up with.
            maximum_concurrent_rpcs=BACKSTOP * workers,
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
        servicer = PaletteLinkServicer(service, auth, max_unary=workers - service.max_streams - MIN_HEADROOM)
        pb_grpc.add_PaletteLinkServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=ThreadPoolExecutor(max_workers=1))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, health_name), self.server)
        service.metrics.init_series(methods=[
            *(f"{SERVICE_NAME}/{m.name}" for m in pb.DESCRIPTOR.services_by_name["PaletteLink"].methods),
            *(f"{health_name}/{m}" for m in ("Check", "Watch")), *reflection.METHODS])
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
        self.worker_limit.refusals.shutdown(wait=False)
