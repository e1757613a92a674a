"""The one error mapping: core error → gRPC status → HTTP status."""

from __future__ import annotations

import logging

import grpc
import pytest

from palettelink import errors as core
from palettelink.errors import ServiceUnavailable
from server.errors import HTTP_STATUS, http_status, status_of
from server.metrics import Metrics


@pytest.mark.parametrize(("exc", "code", "http"), [
    (core.InvalidStream("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (core.InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (core.BundleMismatch("x"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (core.BundleNotFound("x"), grpc.StatusCode.NOT_FOUND, 404),
    (core.BundleError("x"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (core.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (core.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (core.TooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (core.ImageTooLarge("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (ServiceUnavailable("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (core.PaletteLinkError("x"), grpc.StatusCode.INTERNAL, 500),
])
def test_core_errors_map(exc: Exception, code: grpc.StatusCode, http: int) -> None:
    s = status_of(exc)
    assert (s.grpc_code, s.http, s.message, s.name, s.number) == (code, http, "x", code.name, code.value[0])


def test_every_core_error_class_has_a_known_status() -> None:
    classes = [c for c in vars(core).values() if isinstance(c, type) and issubclass(c, core.PaletteLinkError)]
    assert len(classes) >= 8
    for c in classes:
        assert c.code in HTTP_STATUS and isinstance(getattr(grpc.StatusCode, c.code), grpc.StatusCode)


def test_unexpected_errors_are_internal_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    with caplog.at_level(logging.ERROR, "palettelink.server"):
        try:
            raise KeyError("secret detail")
        except KeyError as e:
            status, body = http_status(e, m)
    assert status == 500 and body["error"]["status"] == "INTERNAL"
    assert "secret detail" not in body["error"]["message"]  # internals stay in the log
    assert "secret detail" in caplog.text and "Traceback" in caplog.text
    assert b'palettelink_errors_total{status="INTERNAL"} 1.0' in m.render()


def test_unknown_status_name_is_internal() -> None:
    class Odd(core.PaletteLinkError):
        code = "NOT_A_STATUS"

    assert status_of(Odd("x")).grpc_code == grpc.StatusCode.INTERNAL


def test_messages_are_clipped_whatever_the_error_carries() -> None:
    s = status_of(core.BundleNotFound("no bundle " + "z" * (1 << 20)))
    assert len(s.message) == 1000 and s.message.endswith("…") and s.message.startswith("no bundle zz")
    status, body = http_status(core.InvalidRequest("y" * 5000))
    assert status == 400 and len(body["error"]["message"]) == 1000
