"""The one place where errors become transport statuses.

Every failure inside the server is a :class:`~palettelink.errors.PaletteLinkError` whose ``code`` is a
gRPC status name; this module maps that name to a :class:`grpc.StatusCode` and to an HTTP status
(the Google API mapping, AIP-193). Anything else is a bug: it is logged with its traceback and
answered as ``INTERNAL`` with a generic message, so a broken frame never takes the server down and
internals never leak to clients. The gRPC servicer uses :func:`grpc_errors`; the HTTP app uses
:func:`http_status` (and :func:`http_error` for the web framework's own refusals: unknown route, bad
query); the stream uses :func:`status_of` for per-frame errors.

Messages are clipped to :data:`MAX_MESSAGE` characters: a status travels in gRPC metadata, which has
a hard size limit, and an error must never grow with what a client sent. For the same reason a name a
client sends (bundle, task, client id) is refused past :data:`MAX_NAME` characters (:func:`check_name`)
before anything stores or echoes it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from palettelink.errors import InvalidRequest, PaletteLinkError, TooLarge

log = logging.getLogger("palettelink.server")

HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
# Error classes whose HTTP status is more precise than their gRPC code's.
HTTP_BY_CLASS: dict[type[PaletteLinkError], int] = {TooLarge: 413}
# HTTP statuses the web framework answers by itself → the status name of our error body.
NAME_BY_HTTP: dict[int, str] = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                                404: "NOT_FOUND", 405: "UNIMPLEMENTED", 409: "ABORTED",
                                413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                                499: "CANCELLED", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
                                504: "DEADLINE_EXCEEDED"}
MAX_MESSAGE = 1000
MAX_NAME = 128  # characters of a client-supplied name (bundle, task, client id)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut."""
    text = str(text)
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def check_name(value: str, what: str, limit: int = MAX_NAME) -> str:
    """``value`` if it is at most ``limit`` characters; else :class:`InvalidRequest` quoting only its
    start, so that neither the stored frame list nor the error grows with what a client sent."""
    if len(value) > limit:
        raise InvalidRequest(f"{what} of {len(value)} characters is longer than {limit}: "
                             f"{clip(value, 40)!r}")
    return value


@dataclass(frozen=True)
class ErrorStatus:
    """A failure as every transport sees it."""

    grpc_code: grpc.StatusCode
    message: str
    http_code: int | None = None  # when the error's class says more than its gRPC code
    retry_after_ms: int = 0  # a retry hint (RESOURCE_EXHAUSTED from a limit that frees up)

    @property
    def name(self) -> str:
        return self.grpc_code.name

    @property
    def number(self) -> int:
        """The google.rpc.Code value (what ``FrameError.code`` carries)."""
        return int(self.grpc_code.value[0])

    @property
    def http(self) -> int:
        return self.http_code or HTTP_STATUS.get(self.name, 500)


class ErrorCounter(Protocol):
    def count_error(self, status: str, bundle: str | None = None, codec: str | None = None) -> None: ...


def status_of(exc: BaseException, counter: ErrorCounter | None = None,
              labels: dict[str, str] | None = None) -> ErrorStatus:
    """Classify ``exc``; log unexpected ones with their traceback; count it when asked (by status, and
    for an error about one coded frame by its ``labels``: ``bundle`` and ``codec``)."""
    if isinstance(exc, PaletteLinkError):
        code = getattr(grpc.StatusCode, exc.code, None)
        if not isinstance(code, grpc.StatusCode):
            log.error("error %s carries unknown status name %r", type(exc).__name__, exc.code)
            code = grpc.StatusCode.INTERNAL
        http = next((v for k, v in HTTP_BY_CLASS.items() if isinstance(exc, k)), None)
        status = ErrorStatus(code, clip(str(exc) or type(exc).__name__), http,
                             int(getattr(exc, "retry_after_ms", 0) or 0))
    else:
        log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
        status = ErrorStatus(grpc.StatusCode.INTERNAL,
                             f"internal error ({type(exc).__name__}); see the server log")
    if counter is not None:
        counter.count_error(status.name, **(labels or {}))
    return status


def http_status(exc: BaseException, counter: ErrorCounter | None = None) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for ``exc``."""
    s = status_of(exc, counter)
    return s.http, _body(s.name, s.message)


def _body(name: str, message: str) -> dict[str, Any]:
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return {"error": {"code": int(code.value[0]), "status": code.name, "message": clip(message)}}


def http_error(http: int, message: str) -> dict[str, Any]:
    """Our JSON error body for a refusal the web framework made by itself (unknown route, bad query
    parameter), so every error a client reads has the one shape ``{"error": {code, status, message}}``.
    Not counted in the error metrics: those count what the data plane refused."""
    return _body(NAME_BY_HTTP.get(http, "INTERNAL" if http >= 500 else "INVALID_ARGUMENT"), message)


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(fn: F) -> F:
    """Decorate a servicer method (unary or response-streaming) so any exception becomes a gRPC
    status via ``context.abort``. The servicer's ``metrics`` attribute, if any, counts it, with the
    labels its ``error_labels(method, request)``, if any, gives (bundle and codec of a coded frame)."""

    def fail(self: Any, request: Any, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            return  # the client went away (cancelled, deadline): nobody to answer, nothing to log
        labeller = getattr(self, "error_labels", None)
        labels = labeller(fn.__name__, request) if labeller else None
        s = status_of(exc, getattr(self, "metrics", None), labels)
        if s.retry_after_ms:
            context.set_trailing_metadata((("retry-after-ms", str(s.retry_after_ms)),))
        context.abort(s.grpc_code, s.message)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from fn(self, request, context)
            except Exception as e:  # the one catch-all of the gRPC transport
                fail(self, request, context, e)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:
            fail(self, request, context, e)

    return wrapper  # type: ignore[return-value]
