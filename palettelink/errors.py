"""Typed errors of the core. Transports map ``code`` to their own status in exactly one place:
``server/errors.py`` (to gRPC status codes and to HTTP statuses)."""

from __future__ import annotations


class PaletteLinkError(Exception):
    """Base class. ``code`` is the gRPC status name the error maps to."""

    code = "INTERNAL"


class InvalidStream(PaletteLinkError):
    """A payload that is not a well-formed PaletteLink bitstream (truncated, junk, absurd sizes)."""

    code = "INVALID_ARGUMENT"


class InvalidRequest(PaletteLinkError):
    """A well-formed request asking for something impossible (unknown level, bad rate, bad task)."""

    code = "INVALID_ARGUMENT"


class BundleMismatch(PaletteLinkError):
    """A stream made for another bundle (name, version or table hash differs)."""

    code = "FAILED_PRECONDITION"


class BundleNotFound(PaletteLinkError):
    """No bundle with that name is loaded or present on disk."""

    code = "NOT_FOUND"


class BundleError(PaletteLinkError):
    """A bundle folder that is incomplete or whose files do not match its manifest."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(PaletteLinkError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(PaletteLinkError):
    """A limit of the receiver is reached. ``retry_after_ms`` (when > 0) is the receiver's hint of when
    the same request may succeed (a stream slot or queue room freed); transports pass it on (gRPC
    trailing metadata ``retry-after-ms``, ``FrameError.retry_after_ms``, HTTP ``Retry-After``)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str = "", retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = int(retry_after_ms)


class ServiceUnavailable(PaletteLinkError):
    """The server is not ready (bundles loading) or shutting down."""

    code = "UNAVAILABLE"


class TooLarge(ResourceExhausted):
    """A request over a size limit of its receiver (body bytes, image pixels). Still
    ``RESOURCE_EXHAUSTED`` on gRPC; HTTP answers it 413 (content too large), not 429 (slow down),
    since retrying the same request can never succeed."""


class ImageTooLarge(InvalidRequest):
    """An input image whose header declares more pixels than the edge may decode or the format can
    carry; refused before decoding, naming the file."""
