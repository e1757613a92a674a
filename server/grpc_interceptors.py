"""The gRPC server's interceptors and worker pool: every call counted and timed
(:class:`MetricsInterceptor`), calls without a valid token refused before a handler
(:class:`AuthInterceptor`), and calls refused with a retry hint when every worker is busy
(:class:`WorkerLimit` over :class:`WorkerPool`), like every other limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from palettelink.errors import PaletteLinkError
from server.auth import TokenAuth
from server.errors import status_of
from server.metrics import STREAM_METHOD

HEADROOM, MIN_HEADROOM = 16, 4  # gRPC workers beyond --max-streams (default, least)


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
