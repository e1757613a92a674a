"""gRPC transport: a thin servicer over :class:`~server.service.Service`, plus the server around it
(health, reflection, auth, TLS, limits).

The servicer converts messages and calls the service; errors become statuses only through
``server/errors.py`` (the :func:`~server.errors.grpc_errors` decorator for whole calls,
:func:`~server.errors.status_of` for one bad frame inside a stream, which then goes on).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from palettelink import bitstream, codecs
from palettelink.errors import InvalidRequest, PaletteLinkError, ResourceExhausted
from palettelink.v1 import palettelink_pb2 as pb
from palettelink.v1 import palettelink_pb2_grpc as pb_grpc
from server import __version__, reflection
from server.auth import TokenAuth
from server.errors import check_name, grpc_errors, status_of
from server.results import EdgeReport, FrameResult
from server.service import Service
from server.sessions import StreamSession

log = logging.getLogger("palettelink.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PaletteLink"].full_name
MiB = 1 << 20
HEADROOM, MIN_HEADROOM = 16, 4  # gRPC workers beyond --max-streams (default, least)
BACKSTOP = 8  # gRPC's own concurrent-call limit, in workers (WorkerLimit refuses long before)
STREAM_METHOD = f"{pb.DESCRIPTOR.services_by_name['PaletteLink'].full_name}/Stream"


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
        inbox = _Inbox(request_iterator, svc)
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
        except _Idle as e:
            m.streams_closed.labels(e.reason).inc()
            raise
        finally:
            inbox.close()
            svc.slots.release(slot)

    def _frames(self, inbox: _Inbox, session: StreamSession) -> Iterator[pb.StreamResponse]:
        while True:
            yield from inbox.refusals()
            item = inbox.get(self.service.stream_idle_timeout, idle="frame")
            admitted = inbox.last_admitted
            if item is None:
                yield from inbox.refusals()
                return
            if item is _WAKE:
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


def _peer_host(context: grpc.ServicerContext) -> str:
    """``ipv4:1.2.3.4`` of ``ipv4:1.2.3.4:5678`` (the port changes with every connection)."""
    peer = str(context.peer() or "unknown")
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class _Idle(PaletteLinkError):
    """A stream closed by the server: no header in time, or no frame within the idle timeout."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_WAKE = object()
_END = object()
MAX_THROTTLE_MS = 10_000  # the longest a refused stream is left unread


class _Inbox:
    """The request side of one Stream, read by its own thread so that the handler can wait with a
    timeout (idle streams are closed), frames over the global admission limit are refused on arrival,
    not queued, and a stream with ``max_stream_queue`` frames waiting is not read further (flow
    control holds its sender). Frames admitted here are counted out by :meth:`done_one` (or :meth:`close`)."""

    def __init__(self, requests: Iterator[pb.StreamRequest], service: Service) -> None:
        self.service = service
        self.session: StreamSession | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._refused: deque[pb.FrameResult] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._waiting = 0  # admitted frames of this stream not answered yet
        self.last_admitted = False  # whether the request :meth:`get` returned last was admitted
        self.undelivered = False  # the last answer was yielded after the call had ended
        self._strikes = 0  # refusals in a row (no frame admitted in between)
        self._hold_until = 0.0  # monotonic time before which the stream is not read (throttled)
        self._thread = threading.Thread(target=self._read, args=(requests,), name="stream-inbox", daemon=True)
        self._thread.start()

    def _read(self, requests: Iterator[pb.StreamRequest]) -> None:
        try:
            for req in requests:
                self._admit(req)
                self._throttle()
        except Exception as e:  # the call was cancelled or broke: the handler re-raises it
            self._q.put(e)
        else:
            self._q.put(_END)

    def _admit(self, req: pb.StreamRequest) -> None:
        """Count a frame in and queue it, or refuse it at once (its answer queued in refusals). Under
        the lock, so that :meth:`close` counts out every admitted frame."""
        session = self.session
        if session is None or req.WhichOneof("msg") != "frame":
            with self._lock:
                if not self._closed:
                    self._q.put((req, False))
                return
        svc = self.service
        with self._lock:
            svc.metrics.stream_queue.observe(self._waiting)
            # A full stream queue stops reading: flow control then holds the sender.
            while self._waiting >= svc.admission.max_per_stream and not self._closed:
                self._lock.wait(0.5)
            if self._closed:
                return
            try:
                svc.admission.admit(session.key)
            except ResourceExhausted as e:
                pause = self._hold(e.retry_after_ms)
                if pause > e.retry_after_ms:  # the hint says when this stream is read again
                    e = ResourceExhausted(f"{e}; this stream is throttled for {pause} ms after "
                                          f"{self._strikes} refusals in a row", pause)
                session.refused += 1
                labels = frame_labels(svc, session.bundle, req.frame.payload)
                self._refused.append(frame_error(req.frame, e, svc.metrics, labels))
                self._q.put(_WAKE)
                return
            self._strikes = 0
            self._waiting += 1
            session.queued = self._waiting
            self._q.put((req, True))

    def _hold(self, hint_ms: int) -> int:
        """After a refusal: this stream is not read again for the retry hint, doubled for each refusal
        in a row (up to 10 s, and half the idle timeout). A client that ignores hints is held back by
        HTTP/2 flow control instead of being answered at once, so its resends cost the server (and the
        other clients) next to nothing; one that waits as told never notices. Returns the pause (ms)."""
        if not self.service.throttle_streams:
            return hint_ms
        self._strikes += 1
        cap = min(MAX_THROTTLE_MS, int(self.service.stream_idle_timeout * 500))
        pause = int(min(cap, max(50, hint_ms) * 2 ** min(self._strikes - 1, 8)))
        self._hold_until = time.monotonic() + pause / 1e3
        if self._strikes > 1:
            self.service.metrics.streams_throttled.inc()
        return pause

    def _throttle(self) -> None:
        """Wait out this stream's pause (see :meth:`_hold`) before reading its next request."""
        with self._lock:
            while not self._closed and (left := self._hold_until - time.monotonic()) > 0:
                self._lock.wait(left)

    def get(self, timeout: float, idle: str = "header") -> Any:
        """The next request (None at the end, ``_WAKE`` when a refusal is waiting); :class:`_Idle`
        when none comes within ``timeout`` seconds; the call's own error when it broke."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            what = ("no StreamHeader within" if idle == "header" else "no frame for")
            flag = "" if idle == "header" else " (--stream-idle-timeout)"
            raise _Idle(f"{what} {timeout:g} s{flag}: the server closed this idle stream", idle) from None
        self.last_admitted = isinstance(item, tuple) and item[1]
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        return item if item is _WAKE else item[0]

    def idle(self) -> bool:
        """Every frame this stream received has been answered (none queued, in a task or refused
        and not yet told)."""
        with self._lock, self._q.mutex:
            queued = any(isinstance(item, tuple) for item in self._q.queue)  # not _END, _WAKE, errors
            return self._waiting == 0 and not queued and not self._refused and not self.undelivered

    def refusals(self) -> Iterator[pb.StreamResponse]:
        while self._refused:
            yield pb.StreamResponse(result=self._refused.popleft())

    def done_one(self) -> None:
        with self._lock:
            self._waiting -= 1
            if self.session is not None:
                self.session.queued = self._waiting
            self._lock.notify_all()

    def close(self) -> None:
        """The handler is done: frames admitted but never processed are counted out."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple) and item[1]:
                    self.service.admission.done(client=self.session.key if self.session else "")
                    self._waiting -= 1


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every gRPC call by method and final status code and times it (the first interceptor, so
    calls the auth interceptor refuses are counted too). ``method`` is ``package.Service/Method``;
    calls to methods this server does not have count as ``unknown``."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            self.metrics.count_call("unknown", "UNIMPLEMENTED", 0.0)
            return None
        return _observed(handler, str(details.method).lstrip("/"), self.metrics)


def _call_code(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    """The status a call ended with: the one the handler set (abort, or OK on a Stream the edge closed);
    else DEADLINE_EXCEEDED when the client's deadline passed, CANCELLED when the client went away."""
    code = context.code()  # set by abort() / set_code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(exc, GeneratorExit) or not context.is_active():
        return "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"
    return "OK" if exc is None else "UNKNOWN"


def _observed(handler: Any, method: str, metrics: Any) -> Any:
    """``handler`` with its behaviour timed and counted."""
    behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                or handler.stream_stream)

    def done(context: grpc.ServicerContext, t0: float, exc: BaseException | None) -> None:
        metrics.count_call(method, _call_code(context, exc), time.perf_counter() - t0)

    # A WorkerLimit refusal keeps its own pool (other handlers' pools, health's, are not carried over).
    pool = behavior.experimental_thread_pool if getattr(behavior, "palettelink_refusal", False) else None

    if handler.response_streaming:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            t0, exc = time.perf_counter(), None
            try:
                yield from behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                done(context, t0, exc)
    else:
        def run(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
            t0, exc = time.perf_counter(), None
            try:
                return behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                done(context, t0, exc)

    return _handler_like(handler, run, pool)


class WorkerPool(ThreadPoolExecutor):
    """The gRPC worker pool, counting the calls it holds (submitted, not finished): what
    :class:`WorkerLimit` reads."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="grpc")
        self._count = threading.Lock()
        self.busy = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        def counted(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            finally:
                with self._count:
                    self.busy -= 1

        with self._count:
            self.busy += 1
        try:
            return super().submit(counted, *args, **kwargs)
        except BaseException:
            with self._count:
                self.busy -= 1
            raise


class WorkerLimit(grpc.ServerInterceptor):
    """Refuses a call when all ``--workers`` are busy, like every other refusal: RESOURCE_EXHAUSTED with
    a ``retry-after-ms`` hint and the flag named (gRPC's own limit, ``maximum_concurrent_rpcs``, says
    only "Concurrent RPC limit exceeded!"). The refusal runs on a small pool of its own, since the
    workers are what is missing; a Stream refused so counts as ``streams_refused_total{reason=workers}``."""

    def __init__(self, pool: WorkerPool, workers: int, metrics: Any,
                 retry_after_ms: Callable[[], int]) -> None:
        self.pool, self.workers, self.metrics, self.retry_after_ms = pool, workers, metrics, retry_after_ms
        self.refusals = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-refuse")

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or self.pool.busy < self.workers:
            return handler
        ms = max(1000, self.retry_after_ms())
        if str(details.method).lstrip("/") == STREAM_METHOD:
            self.metrics.streams_refused.labels("workers").inc()
        message = (f"all {self.workers} gRPC workers of this server are busy (--workers, default "
                   f"--max-streams + {HEADROOM}); retry after {ms} ms or use another replica")

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.set_trailing_metadata((("retry-after-ms", str(ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return _handler_like(handler, refuse, self.refusals)


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

    return _handler_like(handler, abort)


def _handler_like(handler: Any, behavior: Callable[..., Any], pool: ThreadPoolExecutor | None = None) -> Any:
    """A handler of the same shape and serializers as ``handler`` that runs ``behavior`` (on ``pool``
    instead of the workers, when given: gRPC reads the behaviour's ``experimental_thread_pool``)."""
    if pool is not None:
        behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
        behavior.palettelink_refusal = True  # type: ignore[attr-defined]
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


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
